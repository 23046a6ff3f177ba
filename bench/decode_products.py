"""The decode step's matrix products alone, by BLAS back end and weight layout (CUDA).

Each product of a decode step (q|k|v with its bias, o, gate|up, down) at the engine's batch (256 rows for 0.5B,
128 for 1.5B and 7B), over one weight matrix a layer (so the weights come from memory, not the L2 cache), timed
as a CUDA graph of all layers: with torch's default back end (cuBLAS) and with cuBLASLt
(torch.backends.cuda.preferred_blas_library), each with the weight as nn.Linear stores it ([out, in]) and
transposed ([in, out], "t"). Prints microseconds a layer and the weights' read rate. With --skinny: ponder's
own Triton product (ponder.kernels.skinny_linear) beside cuBLAS, its default configuration and the best of a sweep
of tile sizes and inner-dimension splits, at the engine's batch and at smaller decode batches.

  python bench/decode_products.py
  PYTHONPATH=src python bench/decode_products.py --skinny [--full]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SHAPES = {  # rows, layers, {product: (out, in)}
    "0.5b": (256, 24, dict(qkv=(1152, 896), o=(896, 896), gate_up=(9728, 896), down=(896, 4864))),
    "1.5b": (128, 28, dict(qkv=(2048, 1536), o=(1536, 1536), gate_up=(17920, 1536), down=(1536, 8960))),
    "7b": (128, 28, dict(qkv=(4608, 3584), o=(3584, 3584), gate_up=(37888, 3584), down=(3584, 18944))),
}


def graph_ms(fn, reps: int = 5) -> float:
    """Median time of one replay of a CUDA graph of fn."""
    g, side = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn(), fn()
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(g):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(True), torch.cuda.Event(True)
        a.record(), g.replay(), b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[reps // 2]


SKINNY_ROWS = {"0.5b": (256, 64), "7b": (128,), "1.5b": (256, 128)}  # the workloads' batches, and a smaller bucket


def skinny(full: bool = False):
    """full: tiles of 32-128 rows and 64 or 128 deep, 4 or 8 warps; else the default's tile height and depth, widths
    32-128 and splits 1-8 (a dozen configurations a product, each compiled once)."""
    import itertools

    from ponder.kernels.skinny_linear import _sms, config, skinny_linear

    sms = _sms(torch.device("cuda"))
    for shape, rows_list in SKINNY_ROWS.items():
        _, layers, products = SHAPES[shape]
        for name, (n, k) in products.items():
            ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(layers)]
            bias = torch.randn(n, device="cuda", dtype=torch.bfloat16) if name == "qkv" else None
            for rows in rows_list:
                x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
                ref = F.linear(x, ws[0], bias).float()
                cublas = graph_ms(lambda: [F.linear(x, w, bias) for w in ws]) / layers * 1000
                mine = config(rows, n, k, sms)
                best = []
                grid = itertools.product((32, 64, 128), (32, 64, 128), (64, 128), (1, 2, 4, 8)) if full else \
                    itertools.product((mine[0],), (32, 64, 128), (64,), (1, 2, 4, 8))
                for bm, bn, bk, split in grid:
                    if bm > max(32, rows) or bm < min(64, rows, mine[0]) or (bm == 128 and bn == 128 and bk == 128):
                        continue
                    for warps in ((4, 8) if full and bm * bn >= 8192 else (4,)):
                        cfg = (bm, bn, bk, split, warps)
                        try:
                            err = (skinny_linear(x, ws[0], bias, cfg).float() - ref).abs().max().item()
                            us = graph_ms(lambda: [skinny_linear(x, w, bias, cfg) for w in ws]) / layers * 1000
                        except Exception as e:  # noqa: BLE001  (a configuration that does not fit: skipped)
                            print(f"  {cfg}: {type(e).__name__}", flush=True)
                            continue
                        best.append((us, cfg, err))
                best.sort()
                if mine not in [c for _, c, _ in best]:  # the default, if the grid missed it
                    best.append((graph_ms(lambda: [skinny_linear(x, w, bias, mine) for w in ws]) / layers * 1000, mine,
                                 (skinny_linear(x, ws[0], bias, mine).float() - ref).abs().max().item()))
                    best.sort()
                at = next((b for b in best if b[1] == mine), None)
                gb = n * k * 2 / 1e9
                rate = lambda us: f"{us:6.1f} us ({gb / (us * 1e-6) / 1e3:.2f} TB/s)"  # noqa: E731
                print(f"{shape:5s} {name:8s} {rows:3d} x {n} x {k}: cuBLAS {rate(cublas)}  default {mine} "
                      + (rate(at[0]) if at else "not run") + f"  best {best[0][1]} {rate(best[0][0])} err {best[0][2]:.3g}"
                      + "  next " + ", ".join(f"{c} {u:.1f}" for u, c, _ in best[1:4]), flush=True)
                if name == "gate_up":  # with SwiGLU: cuBLAS then the engine's SwiGLU kernel, against it in the epilogue
                    from ponder.kernels.skinny_linear import skinny_swiglu
                    from ponder.kernels.swiglu import swiglu_halves, triton_swiglu_halves

                    two = graph_ms(lambda: [triton_swiglu_halves(F.linear(x, w)) for w in ws]) / layers * 1000
                    fused = {c: graph_ms(lambda: [skinny_swiglu(x, w, c) for w in ws]) / layers * 1000
                             for c in {config(rows, n // 2, k, sms), best[0][1]}}
                    err = (skinny_swiglu(x, ws[0]).float() - swiglu_halves(ref.to(torch.bfloat16)).float()).abs().max().item()
                    print(f"      with SwiGLU: cuBLAS + SwiGLU kernel {two:6.1f} us; in the epilogue "
                          + ", ".join(f"{c} {u:.1f} us" for c, u in fused.items()) + f" (err {err:.3g})", flush=True)
            del ws


def main():
    import sys

    if "--skinny" in sys.argv:
        return skinny(full="--full" in sys.argv)
    for shape, (rows, layers, products) in SHAPES.items():
        for name, (n, k) in products.items():
            ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(layers)]
            wt = [w.t().contiguous() for w in ws]
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            bias = torch.randn(n, device="cuda", dtype=torch.bfloat16) if name == "qkv" else None
            res = {}
            for lib in ("cublas", "cublaslt"):
                torch.backends.cuda.preferred_blas_library(lib)
                res[lib] = graph_ms(lambda: [F.linear(x, w, bias) for w in ws]) / layers * 1000
                res[lib + " t"] = graph_ms(lambda: [F.linear(x, w.t(), bias) for w in wt]) / layers * 1000
            torch.backends.cuda.preferred_blas_library("cublas")
            gb = n * k * 2 / 1e9
            print(f"{shape:5s} {name:8s} {rows} x {n} x {k}: "
                  + "  ".join(f"{lib} {us:6.1f} us ({gb / (us * 1e-6) / 1e3:.2f} TB/s)" for lib, us in res.items()), flush=True)
            del ws, wt


if __name__ == "__main__":
    main()
