"""The decode attention kernel alone, over a paged cache: time per call for batches of rows with uniform or
long-tailed live lengths, at several caps on the slots one program reads (decode_attention.MAX_CHUNK), and
(--sweep) over the kernel's launch settings: slots a tile, warps, pipeline stages, splits.

  PYTHONPATH=src python bench/decode_attention.py
  PYTHONPATH=src python bench/decode_attention.py --sweep --chunks
  PYTHONPATH=src python bench/decode_attention.py --kv-dtype fp8 --sweep --chunks 1073741824 --cases "7b 128"
"""

from __future__ import annotations

import argparse
import json

import torch

from ponder.kernels import decode_attention as da

SHAPES = {"0.5b": (2, 7, 64), "1.5b": (2, 6, 128), "7b": (4, 7, 128)}  # kv heads, query heads per kv head, head dim


def case(shape, batch, lengths, block=32, seed=0, kv_dtype=torch.bfloat16):
    n_kv, group, dim = SHAPES[shape]
    g = torch.Generator(device="cuda").manual_seed(seed)
    per_row = -(-max(lengths) // block)
    # K and V in pools of their own, as the engine holds them (one pool for both let V's reads hit the cache)
    k_pool, v_pool = (torch.randn((batch * per_row + 1, n_kv, block, dim), generator=g, device="cuda", dtype=torch.bfloat16)
                      .to(kv_dtype) for _ in range(2))
    table = 1 + torch.randperm(batch * per_row, generator=g, device="cuda").view(batch, per_row)
    q = torch.randn((batch, n_kv, group, dim), generator=g, device="cuda", dtype=torch.bfloat16)
    pos = torch.tensor(lengths, device="cuda") - 1
    return q, k_pool, v_pool, table, pos, dim**-0.5


def timed(fn, reps=50):
    """us a call, from a CUDA graph of `reps` calls: a short kernel's launch from Python outlasts the kernel."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    graph.replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / reps * 1000  # us


def sweep(q, k_pool, v_pool, table, pos, scale, length, live) -> dict:
    """Every launch setting of the kernel on one case: the default (the kernel's own choice) and the fastest five."""
    batch, n_kv = q.shape[:2]
    found = {}
    default = timed(lambda: da.triton_attention(q, k_pool, v_pool, table, pos, scale, length))
    for tile in (32, 64, 128, 256):
        base, _ = da.plan(batch, n_kv, length, q.device, tile)
        for splits in sorted({base, 2 * base}):
            for warps in (4, 8):
                for stages in (1, 2, 3):
                    try:
                        us = timed(lambda: da.triton_attention(q, k_pool, v_pool, table, pos, scale, length, splits=splits,
                                                               block_n=tile, num_warps=warps, num_stages=stages), reps=20)
                    except Exception as e:  # noqa: BLE001  (out of shared memory: not a candidate)
                        print("  skipped", tile, splits, warps, stages, type(e).__name__, flush=True)
                        continue
                    found[f"tile {tile} splits {splits} warps {warps} stages {stages}"] = us
    best = sorted(found.items(), key=lambda kv: kv[1])[:5]
    row = {"default": dict(us=round(default, 1), tb_s=round(live / default / 1e6, 2))}
    row.update({k: dict(us=round(v, 1), tb_s=round(live / v / 1e6, 2)) for k, v in best})
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", nargs="*", type=int, default=[1 << 30, 8192, 4096, 2048, 1024, 512])
    ap.add_argument("--configs", nargs="*", default=[], help="warps,stages pairs to try at the default cap, e.g. 8,2 4,3")
    ap.add_argument("--sweep", action="store_true", help="every tile x warps x stages x splits; the fastest five and the default")
    ap.add_argument("--cases", nargs="*", help="names' beginnings, e.g. '7b 128' (default: all)")
    ap.add_argument("--shared-prefix", type=int, default=0, metavar="SLOTS",
                    help="also time each case with the first SLOTS slots' blocks shared by groups of 8 adjacent rows, "
                         "as the engine shares a prompt's full blocks among its G samples (how much of that the L2 "
                         "cache already saves, against reading each distinct block once)")
    ap.add_argument("--kv-dtype", choices=["bf16", "fp8"], default="bf16", help="the cache's dtype (fp8: e4m3, kv_dtype: fp8)")
    a = ap.parse_args()
    kv_dtype = torch.bfloat16 if a.kv_dtype == "bf16" else torch.float8_e4m3fn
    import sys
    sys.path.insert(0, "bench")
    from rollout import long_tail

    tail = long_tail(512, 8192)
    cases = {
        "0.5b 256 rows, 130 slots": ("0.5b", 256, [130] * 256, 256),
        "0.5b 256 rows, 129..640 slots": ("0.5b", 256, [129 + (i * 511) // 255 for i in range(256)], 672),
        "7b 128 rows, 640 slots": ("7b", 128, [640] * 128, 1184),
        "7b 128 rows, 129..1,152 slots": ("7b", 128, [129 + (i * 1023) // 127 for i in range(128)], 1184),
        "7b 512 rows, long tail (+64 prompt)": ("7b", 512, [64 + x for x in tail], 8288),
        "1.5b 128 rows, 4,200 slots": ("1.5b", 128, [4200] * 128, 4224),
        "1.5b 512 rows, long tail (+64 prompt)": ("1.5b", 512, [64 + x for x in tail], 8288),
        "1.5b 51 longest of the tail": ("1.5b", 51, sorted(64 + x for x in tail)[-51:], 8288),
        "1.5b 512 rows, 1,000 slots each": ("1.5b", 512, [1000] * 512, 8288),
    }
    out = {}
    for name, (shape, batch, lengths, length) in cases.items():
        if a.cases and not any(name.startswith(c) for c in a.cases):
            continue
        q, k_pool, v_pool, table, pos, scale = case(shape, batch, lengths, kv_dtype=kv_dtype)
        live = sum(lengths) * k_pool.shape[1] * k_pool.shape[3] * 2 * k_pool.element_size()
        row = {}
        if a.sweep:
            row = sweep(q, k_pool, v_pool, table, pos, scale, length, live)
        for chunk in a.chunks:
            splits, _ = da.plan(batch, k_pool.shape[1], length, q.device, max_chunk=chunk)
            us = timed(lambda: da.triton_attention(q, k_pool, v_pool, table, pos, scale, length, splits=splits))
            row[f"chunk {chunk if chunk < 1 << 30 else 'none'}"] = dict(us=round(us, 1), splits=splits, tb_s=round(live / us / 1e6, 2))
        for cfg in a.configs:
            warps, stages = map(int, cfg.split(","))
            splits, _ = da.plan(batch, k_pool.shape[1], length, q.device)
            us = timed(lambda: da.triton_attention(q, k_pool, v_pool, table, pos, scale, length, splits=splits,
                                                   num_warps=warps, num_stages=stages))
            row[f"warps {warps} stages {stages}"] = dict(us=round(us, 1), splits=splits, tb_s=round(live / us / 1e6, 2))
        if a.shared_prefix:
            shared = table.clone()
            first = a.shared_prefix // k_pool.shape[2]
            leaders = torch.arange(batch, device=table.device) // 8 * 8
            shared[:, :first] = table[leaders, :first]
            splits, _ = da.plan(batch, k_pool.shape[1], length, q.device)
            distinct = timed(lambda: da.triton_attention(q, k_pool, v_pool, table, pos, scale, length, splits=splits))
            us = timed(lambda: da.triton_attention(q, k_pool, v_pool, shared, pos, scale, length, splits=splits))
            unique = 1 - sum(min(n, first * k_pool.shape[2]) for n in lengths) * 7 / 8 / sum(lengths)
            row["shared prefix"] = dict(us=round(us, 1), distinct_us=round(distinct, 1), ratio=round(us / distinct, 2),
                                        unique_reads=round(unique, 2))
        out[name] = row
        print(name, json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
