"""Random norms and biases for small test models (transformers initialises norms to 1 and biases to 0), so that
every weight a pass reads matters. Plain module, not a test: the CUDA tests import it where test modules that name
classes missing from an older transformers (InternLM3) cannot be imported."""

import torch


def randomized(model, std=0.15, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + std * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model
