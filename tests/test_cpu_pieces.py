"""The CPU's leaner norm, rotary and SwiGLU (ponder.kernels.norm / rope / decode_step CPU pieces): fewer eager
operations, the same numbers. The demo's figures depend on that, bit for bit, so these compare with torch.equal."""

import pytest
import torch

from ponder.kernels import decode_step, norm, rope, training_step


def rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, width", [(37, 128), (4364, 128), (5, 896)])
def test_norms_equal_the_eager_ones_values_and_gradients(rows, width, dtype):
    x, r, w = rand(rows, width, dtype=dtype), rand(rows, width, seed=1, dtype=dtype), 1 + rand(width, seed=2) * 0.1
    for out in (None, torch.bfloat16):
        assert torch.equal(norm.rms_cpu(x, w, 1e-6, out), norm.rms(x, w, 1e-6, out))
        assert all(torch.equal(a, b) for a, b in zip(norm.add_rms_cpu(x, r, w, 1e-6, out), norm.add_rms(x, r, w, 1e-6, out)))
    grads = []
    for fn in (norm.add_rms, norm.add_rms_train_cpu):
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        y, h = fn(xs, r, ws, 1e-6)
        (h.float() * rand(rows, width, seed=3)).sum().backward()
        grads.append((y, h, xs.grad, ws.grad))
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_rotary_against_a_signed_sine_equals_rope_values_and_gradients():
    q, k, v = rand(9, 7, 64), rand(9, 2, 64, seed=1), rand(9, 2, 64, seed=2)
    ang = rand(9, 1, 64, seed=3)
    cos, sin = ang.cos(), ang.sin()
    ssin = rope.signed_sin(sin)
    want_q, want_kv = rope.rope_kv(q, k, v, cos, sin)
    got_q, got_kv = decode_step.rope_kv_signed(q, k, v, cos, ssin)
    assert torch.equal(got_q, want_q) and torch.equal(got_kv, want_kv)
    grads = []
    for fn in (rope.rope_qk, rope.rope_qk_signed):
        qs, ks = q.clone().requires_grad_(), k.clone().requires_grad_()
        a, b = fn(qs, ks, cos, sin)
        (a * rand(*a.shape, seed=4)).sum().add((b * rand(*b.shape, seed=5)).sum()).backward()
        grads.append((a, b, qs.grad, ks.grad))
    assert all(torch.equal(x, y) for x, y in zip(*grads))


def test_cpu_swiglu_and_the_pieces_the_cpu_gets():
    x = rand(64, 2 * 320)
    assert torch.equal(decode_step.swiglu_halves_cpu(x.clone()), decode_step.EAGER["swiglu_halves"](x))
    assert decode_step.kernels(torch.device("cpu")) is decode_step.CPU
    assert training_step.pieces(torch.device("cpu")) is training_step.CPU


def test_a_hooked_layer_is_called_as_a_module_in_the_cpu_decode_step():
    """The CPU decode step calls plain linear layers as F.linear (no module call), but a layer with a forward hook
    (a user's probe, an adapter library's) must still run through it."""
    from ponder.models import load
    from ponder.rollout import SamplingParams
    from ponder.rollout.fast import FastEngine

    model, tok = load("tiny-random", seed=1)
    seen = []
    model.model.layers[0].self_attn.o_proj.register_forward_hook(lambda mod, args, out: seen.append(out.shape[0]))
    FastEngine(model, tok).generate([tok("12+3=").input_ids], SamplingParams(n=2, temperature=0.0, max_tokens=4))
    assert len(seen) >= 4  # prefill, then each decode step
