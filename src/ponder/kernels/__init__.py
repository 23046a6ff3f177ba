"""The layer below the fast engine (ponder.rollout) and the packed training pass (ponder.rl): the fused
pieces both run and the description of the model families both read, so neither imports the other.

  arch.py              one entry per model family: where its modules are, its attention shape (describe)
  norm.py              RMSNorm, alone and after a residual add
  rope.py              rotary: the torch math; the training pass's q/k rotary as Triton (with backward)
  rope_store.py        the decode step's rotary and paged KV-cache write as one Triton kernel
  swiglu.py            SwiGLU: the torch math; the training pass's as Triton (with backward)
  sampler.py           counter-based sampling (Gumbel-max on CPU, a Triton CDF inversion on CUDA)
  decode_attention.py  one new token per row over the paged KV cache (split-KV Triton kernel)
  head_logprobs.py     output head and log-softmax as one op, without float32 logits
  accumulate.py        out += a @ b into float32 gradients, rounded once (cuBLAS's float32 output)
  trials.py            compile or trial each piece; its torch twin where that fails
  decode_step.py       the set of pieces the decode step uses on a device
  training_step.py     the set of pieces the packed training pass uses on a device (with backward)

Every Triton or compiled piece has a torch twin with the same math, which runs on the CPU and is what the
CPU tests compare against.
"""
