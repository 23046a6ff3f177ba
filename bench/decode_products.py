"""The decode step's matrix products alone, by BLAS back end and weight layout (CUDA).

Each product of a decode step (q|k|v with its bias, o, gate|up, down) at the engine's batch (256 rows for 0.5B,
128 for 1.5B and 7B), over one weight matrix a layer (so the weights come from memory, not the L2 cache), timed
as a CUDA graph of all layers: with torch's default back end (cuBLAS) and with cuBLASLt
(torch.backends.cuda.preferred_blas_library), each with the weight as nn.Linear stores it ([out, in]) and
transposed ([in, out], "t"). Prints microseconds a layer and the weights' read rate. (A Triton product of
ponder's own, timed beside cuBLAS by an earlier --skinny option of this script, lost in every case: bench/README.md.)

--fp8: beside cuBLAS in bf16, the same product as the engine's weight_dtype fp8 computes it
(ponder.kernels.fp8_linear: e4m3 weights with a scale per output row, e4m3 rows with a scale per row,
torch._scaled_mm), with the rows cast once beforehand ("fp8") and with the cast in each product: torch's twin
compiled, and the Triton kernel the engine uses on CUDA.

  python bench/decode_products.py [--fp8]
"""

from __future__ import annotations

import sys

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


def fp8_case(shape: str, name: str, rows: int, layers: int, n: int, k: int) -> None:
    from ponder.kernels.fp8_linear import fp8_linear, fp8_matrix, rows_fp8, triton_rows_fp8

    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(layers)]
    w8 = [fp8_matrix(w) for w in ws]  # (e4m3 matrix, scales [1, n])
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16) if name == "qkv" else None
    quant = torch.compile(rows_fp8, dynamic=False)
    cast = quant(x)
    casts = {"fp8": lambda _: cast, "fp8 + rows cast": quant, "fp8 + Triton cast": triton_rows_fp8}
    res = {"bf16": graph_ms(lambda: [F.linear(x, w, bias) for w in ws]) / layers * 1000}
    for label, rows_of in casts.items():
        res[label] = graph_ms(lambda: [fp8_linear(x, *w, bias, rows_of) for w in w8]) / layers * 1000
    got, want = fp8_linear(x, *w8[0], bias).float(), F.linear(x, ws[0], bias).float()
    err = ((got - want).norm() / want.norm()).item()
    print(f"{shape:5s} {name:8s} {rows} x {n} x {k}: " + "  ".join(f"{v} {us:6.1f} us" for v, us in res.items())
          + f"  (fp8 relative error {err:.3f})", flush=True)


def main():
    if "--fp8" in sys.argv:
        for shape, (rows, layers, products) in SHAPES.items():
            for name, (n, k) in {**products, "head": (151936, products["o"][1])}.items():
                fp8_case(shape, name, rows, 1 if name == "head" else layers, n, k)
        return
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
