"""The decode attention kernel alone, over a paged cache: time per call for batches of rows with uniform or
long-tailed live lengths, at several caps on the slots one program reads (decode_attention.MAX_CHUNK).

  PYTHONPATH=src python bench/decode_attention.py
"""

from __future__ import annotations

import argparse
import json

import torch

from ponder.kernels import decode_attention as da

SHAPES = {"0.5b": (2, 7, 64), "1.5b": (2, 6, 128), "7b": (4, 7, 128)}  # kv heads, query heads per kv head, head dim


def case(shape, batch, lengths, block=32, seed=0):
    n_kv, group, dim = SHAPES[shape]
    g = torch.Generator(device="cuda").manual_seed(seed)
    per_row = -(-max(lengths) // block)
    pool = torch.randn((batch * per_row + 1, n_kv, block, dim), generator=g, device="cuda", dtype=torch.bfloat16)
    table = 1 + torch.randperm(batch * per_row, generator=g, device="cuda").view(batch, per_row)
    q = torch.randn((batch, n_kv, group, dim), generator=g, device="cuda", dtype=torch.bfloat16)
    pos = torch.tensor(lengths, device="cuda") - 1
    return q, pool, table, pos, dim**-0.5


def timed(fn, reps=50):
    fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / reps * 1000  # us


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", nargs="+", type=int, default=[1 << 30, 8192, 4096, 2048, 1024, 512])
    ap.add_argument("--configs", nargs="*", default=[], help="warps,stages pairs to try at the default cap, e.g. 8,2 4,3")
    a = ap.parse_args()
    import sys
    sys.path.insert(0, "bench")
    from rollout import long_tail

    tail = long_tail(512, 8192)
    cases = {
        "0.5b 256 rows, 129..640 slots": ("0.5b", 256, [129 + (i * 511) // 255 for i in range(256)], 672),
        "1.5b 128 rows, 4,200 slots": ("1.5b", 128, [4200] * 128, 4224),
        "1.5b 512 rows, long tail (+64 prompt)": ("1.5b", 512, [64 + x for x in tail], 8288),
        "1.5b 51 longest of the tail": ("1.5b", 51, sorted(64 + x for x in tail)[-51:], 8288),
        "1.5b 512 rows, 1,000 slots each": ("1.5b", 512, [1000] * 512, 8288),
    }
    out = {}
    for name, (shape, batch, lengths, length) in cases.items():
        q, pool, table, pos, scale = case(shape, batch, lengths)
        live = sum(lengths) * pool.shape[1] * pool.shape[3] * 2 * 2
        row = {}
        for chunk in a.chunks:
            splits, _ = da.plan(batch, pool.shape[1], length, q.device, max_chunk=chunk)
            us = timed(lambda: da.triton_attention(q, pool, pool, table, pos, scale, length, splits=splits))
            row[f"chunk {chunk if chunk < 1 << 30 else 'none'}"] = dict(us=round(us, 1), splits=splits, tb_s=round(live / us / 1e6, 2))
        for cfg in a.configs:
            warps, stages = map(int, cfg.split(","))
            splits, _ = da.plan(batch, pool.shape[1], length, q.device)
            us = timed(lambda: da.triton_attention(q, pool, pool, table, pos, scale, length, splits=splits,
                                                   num_warps=warps, num_stages=stages))
            row[f"warps {warps} stages {stages}"] = dict(us=round(us, 1), splits=splits, tb_s=round(live / us / 1e6, 2))
        out[name] = row
        print(name, json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
