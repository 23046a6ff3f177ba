"""ponder's training kernels beside liger-kernel's on the same shapes (issue 16): forward + backward times and
the largest difference of outputs and gradients.

Pieces, each on one packed micro-batch of `--tokens` tokens (the planned budget's size), random bf16 inputs:
- rms: RMSNorm (ours: compiled with its backward) / liger_rms_norm
- add_rms: residual add then RMSNorm (ours compiled) / liger_fused_add_rms_norm
- swiglu: silu(gate) * up (ours: Triton pair) / liger_swiglu
- rope: q and k rotated, q a strided view of the q|k|v product as the packed pass gives it (ours: Triton pair)
  / liger_rope (it takes [batch, heads, tokens, dim]; the view is passed transposed, no copy)
- head: log p(target) through the output head without full float32 logits (ours: ponder.kernels.head_logprobs,
  log-probs only and with entropy) / liger_fused_linear_cross_entropy(reduction="none") = -log p
- grpo: head + clipped GRPO loss on [B, T] rows (ours: head_logprobs then ponder.rl.losses.policy_loss)
  / LigerFusedLinearGRPOLoss (beta 0, loss_type grpo)

Needs CUDA and liger-kernel (`pip install liger-kernel`; not a ponder dependency).
  PYTHONPATH=src python3 bench/liger.py --shapes 0.5b 1.5b
"""

from __future__ import annotations

import argparse
import json

import torch

SHAPES = {  # hidden, heads, kv heads, head dim, intermediate, vocabulary (Qwen2.5)
    "0.5b": (896, 14, 2, 64, 4864, 151936),
    "1.5b": (1536, 12, 2, 128, 8960, 151936),
    "7b": (3584, 28, 4, 128, 18944, 152064),
}


def timed(fn, grads, reps: int = 20) -> float:
    """Median ms of forward + backward (`fn()` returns outputs; `grads` their upstream gradients)."""
    def once():
        outs = fn()
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        torch.autograd.backward([o for o in outs if o.requires_grad], [g for o, g in zip(outs, grads) if o.requires_grad])

    for _ in range(3):
        once()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        once()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def leaves(*xs):
    return [x.detach().clone().requires_grad_(True) for x in xs]


def max_diff(fa, fb, inputs, grads) -> float:
    """Largest |difference| over outputs and input gradients, relative to the largest |value| of ours."""
    ia, ib = leaves(*inputs), leaves(*inputs)
    oa, ob = fa(*ia), fb(*ib)
    oa, ob = (oa if isinstance(oa, tuple) else (oa,)), (ob if isinstance(ob, tuple) else (ob,))
    torch.autograd.backward(list(oa), list(grads))
    torch.autograd.backward(list(ob), list(grads))
    worst = 0.0
    for x, y in [*zip(oa, ob), *zip([i.grad for i in ia], [i.grad for i in ib])]:
        worst = max(worst, ((x.float() - y.float()).abs().max() / x.float().abs().max().clamp_min(1e-12)).item())
    return worst


def compare(name, ours, theirs, inputs, grads, rows):
    ia, ib = leaves(*inputs), leaves(*inputs)
    t_ours = timed(lambda: ours(*ia), grads)
    t_theirs = timed(lambda: theirs(*ib), grads)
    rows.append({"piece": name, "ours_ms": t_ours, "liger_ms": t_theirs, "rel_diff": max_diff(ours, theirs, inputs, grads)})
    r = rows[-1]
    print(f"{name:>16} | ours {t_ours:8.3f} ms | liger {t_theirs:8.3f} ms | liger/ours {t_theirs / t_ours:5.2f} | "
          f"rel. diff {r['rel_diff']:.2e}", flush=True)


def run_shape(shape: str, tokens: int, rows_of: int) -> list[dict]:
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    from liger_kernel.transformers.functional import (liger_fused_add_rms_norm, liger_fused_linear_cross_entropy,
                                                       liger_rms_norm, liger_rope, liger_swiglu)

    from ponder.kernels.head_logprobs import head_logprobs
    from ponder.kernels.training_step import pieces
    from ponder.rl.losses import policy_loss

    d, nh, nkv, hd, inter, vocab = SHAPES[shape]
    dev, bf = torch.device("cuda"), torch.bfloat16
    K = pieces(dev)
    g = torch.Generator(device=dev).manual_seed(0)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, device=dev, generator=g) * scale).to(bf)  # noqa: E731
    rows: list[dict] = []
    print(f"\n{shape}: {tokens:,} tokens a micro-batch", flush=True)
    x, w, r = rnd(tokens, d), rnd(d, scale=0.1) + 1, rnd(tokens, d)
    compare("rms", lambda x, w: K["rms"](x, w, 1e-6), lambda x, w: liger_rms_norm(x, w, 1e-6, in_place=False),
            (x, w), (rnd(tokens, d),), rows)
    compare("add_rms", lambda x, r, w: K["add_rms"](x, r, w, 1e-6),
            lambda x, r, w: liger_fused_add_rms_norm(x, r, w, 1e-6, in_place=False)[::-1],  # theirs: (normed, sum)
            (x, r, w), (rnd(tokens, d), rnd(tokens, d)), rows)
    a, b = rnd(tokens, inter), rnd(tokens, inter)
    compare("swiglu", K["swiglu"], liger_swiglu, (a, b), (rnd(tokens, inter),), rows)

    # rotary: q and k as strided views of one q|k|v product, [tokens, heads, dim]
    qkv = rnd(tokens, (nh + 2 * nkv) * hd)
    pos = torch.arange(tokens, device=dev) % 4096
    inv = 1.0 / (1e6 ** (torch.arange(0, hd, 2, device=dev).float() / hd))
    ang = torch.cat([pos[:, None] * inv] * 2, -1)
    cos, sin = ang.cos().to(bf), ang.sin().to(bf)

    def split(t):
        return t[:, : nh * hd].view(tokens, nh, hd), t[:, nh * hd : (nh + nkv) * hd].view(tokens, nkv, hd)

    def ours_rope(t):
        q, k = split(t)
        return K["rope_qk"](q, k, cos[:, None], sin[:, None])

    def liger_rope_packed(t):
        q, k = split(t)
        q, k = liger_rope(q[None].transpose(1, 2), k[None].transpose(1, 2), cos[None], sin[None])
        return q.transpose(1, 2)[0], k.transpose(1, 2)[0]

    compare("rope", ours_rope, liger_rope_packed, (qkv,), (rnd(tokens, nh, hd), rnd(tokens, nkv, hd)), rows)

    # the head: log-probs of targets without full float32 logits
    h, W = rnd(tokens, d), rnd(vocab, d, scale=0.02)
    tgt = torch.randint(0, vocab, (tokens,), device=dev, generator=g)
    gl = torch.randn(tokens, device=dev, generator=g)
    compare("head", lambda h, W: head_logprobs(h, W, tgt, with_entropy=False, keep=False)[0],
            lambda h, W: -liger_fused_linear_cross_entropy(h, W, tgt, reduction="none"), (h, W), (gl,), rows)
    compare("head+entropy", lambda h, W: head_logprobs(h, W, tgt, with_entropy=True, keep=False)[0],
            lambda h, W: -liger_fused_linear_cross_entropy(h, W, tgt, reduction="none"), (h, W), (gl,), rows)

    # GRPO loss over [B, T] rows: head + clipped objective, beta 0, grpo aggregation
    B = rows_of
    T = tokens // B
    hb = rnd(B, T, d)
    ids = torch.randint(0, vocab, (B, T), device=dev, generator=g)
    mask = torch.ones(B, T, device=dev)
    adv = torch.randn(B, device=dev, generator=g)
    weight = mask / (T * B)
    one = torch.ones((), device=dev)
    liger_loss = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="grpo", epsilon_low=0.2, epsilon_high=0.28)

    def ours_grpo(h, W):
        lp, _ = head_logprobs(h.reshape(-1, d), W, ids.reshape(-1), with_entropy=False, keep=False)
        lp = lp.view(B, T)
        return policy_loss(lp, lp.detach(), adv, weight, 0.2, 0.28)[0]

    def theirs_grpo(h, W):
        return liger_loss(h, W, ids, mask, adv)[0]

    compare(f"grpo ({B} rows)", ours_grpo, theirs_grpo, (hb, W), (one,), rows)
    return [{"shape": shape, "tokens": tokens, **r} for r in rows]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["0.5b", "1.5b"], choices=list(SHAPES))
    ap.add_argument("--tokens", type=int, default=32768, help="tokens a micro-batch (the planned budget's cap)")
    ap.add_argument("--rows", type=int, default=64, help="rows of the GRPO loss comparison")
    ap.add_argument("--json")
    args = ap.parse_args()
    import liger_kernel

    print(f"torch {torch.__version__}, liger-kernel {getattr(liger_kernel, '__version__', '?')}, {torch.cuda.get_device_name()}")
    out = [r for s in args.shapes for r in run_shape(s, args.tokens, args.rows)]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
