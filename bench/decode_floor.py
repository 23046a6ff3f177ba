"""The floor of a rollout's decode time: per step, one read of the bf16 weights and of every live K/V slot at
the memory's speed, or the step's matrix products at the chip's rate, whichever is longer (H200: 4.8 TB/s,
800 TFLOP/s bf16 measured on large products). Every sample decodes from the first step (no admission limit).
With --group G each prompt's K/V is read once a step for its G samples while any of them runs (an attention that
shares prefixes), and the floor is printed both ways: what such a kernel could save at best.

  PYTHONPATH=src python bench/decode_floor.py --shape 1.5b --n 512 --new 8192   # long-tailed beside the same tokens at their mean
  PYTHONPATH=src python bench/decode_floor.py --shape 0.5b --n 256 --new 512 --uniform --group 8   # issue 15's rollout
"""

from __future__ import annotations

import argparse

from rollout import SHAPES, long_tail

BANDWIDTH, FLOPS = 4.8e12, 800e12


def model_sizes(shape: str, vocab: int = 151936) -> tuple[float, float]:
    """(parameters read a step, K/V bytes a token) of a Qwen2.5 shape in bf16."""
    c = SHAPES[shape]
    d, L, f = c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"]
    head = d // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * head
    per_layer = d * (d + 2 * kv) + d * d + 3 * d * f
    return L * per_layer + vocab * d, L * 2 * kv * 2


def floor(lengths: list[int], shape: str, prompt: int = 128, group: int = 1) -> float:
    """Seconds; samples i*group .. (i+1)*group - 1 share a prompt, read once a step where group > 1."""
    params, kv = model_sizes(shape)
    groups = [lengths[i : i + group] for i in range(0, len(lengths), group)]
    t = 0.0
    for s in range(max(lengths)):
        rows = sum(1 for n in lengths if n > s)
        own = sum(s for n in lengths if n > s)
        prompts = sum(1 for g in groups if max(g) > s)  # one read of a prompt's K/V for its running samples
        t += max((2 * params + (own + prompts * prompt) * kv) / BANDWIDTH, rows * 2 * params / FLOPS)
    return t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="1.5b", choices=[s for s in SHAPES if s != "smoke"])
    ap.add_argument("--n", type=int, default=512, help="samples")
    ap.add_argument("--new", type=int, default=8192, help="the length limit")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--group", type=int, default=1, help="samples a prompt: its K/V shared by them (G > 1)")
    ap.add_argument("--uniform", action="store_true", help="every sample at --new tokens (no long tail)")
    a = ap.parse_args()
    if a.uniform:
        lengths = [a.new] * a.n
        apart, shared = floor(lengths, a.shape, a.prompt), floor(lengths, a.shape, a.prompt, a.group)
        print(f"{a.shape}: {a.n} x ({a.prompt} + {a.new}) tokens: floor {apart:.2f} s, the prompts' K/V read once for "
              f"each {a.group} samples {shared:.2f} s ({1 - shared / apart:.0%} less)")
        return
    tail = long_tail(a.n, a.new)
    mean = round(sum(tail) / len(tail))
    lt, uni = floor(tail, a.shape, a.prompt), floor([mean] * a.n, a.shape, a.prompt)
    tokens = sum(tail)
    print(f"{a.shape}: long-tailed floor {lt:.1f} s ({tokens / lt:,.0f} tokens/s); the same {tokens:,} tokens at their "
          f"mean length {mean}: {uni:.1f} s ({tokens / uni:,.0f} tokens/s); ratio {uni / lt:.2f}")
    if a.group > 1:
        lt_s, uni_s = floor(tail, a.shape, a.prompt, a.group), floor([mean] * a.n, a.shape, a.prompt, a.group)
        print(f"  the prompts' K/V read once for each {a.group} samples: long-tailed {lt_s:.1f} s, at the mean "
              f"{uni_s:.1f} s; ratio {uni_s / lt_s:.2f}")


if __name__ == "__main__":
    main()
