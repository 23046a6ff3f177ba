"""One captured decode step of the fast engine beside the same rows in parts on CUDA streams of their own.

A small model's decode products and attention at a few hundred rows are short kernels; the question was
whether parts of the batch, each on its own stream and captured in one graph, fill the GPU better than one
step over all rows. Also: the step captured with cuBLASLt preferred. Times are CUDA-graph replays at a fixed
position, every row through blocks of its own.

  PYTHONPATH=src python3 bench/decode_streams.py
"""

from __future__ import annotations

import copy

import torch

from rollout import build, force_length, spread_tables
from ponder.models.tiny import char_tokenizer
from ponder.rollout import SamplingParams
from ponder.rollout.fast import FastEngine

PER_ROW = ("tokens", "pos", "rows_idx", "table", "row_seq", "n_out", "limit", "live")
CASES = (("0.5b", 256, (130, 400)), ("1.5b", 256, (130, 400)), ("7b", 128, (640,)))


def at_position(f, batch: int, pos: int):
    t = spread_tables(f, batch, min(pos + 150, f.positions))  # room for the replays' positions
    f.table[:batch, : t.shape[1]] = t
    f.pos[:batch] = pos
    f.n_out[:batch] = 1


def part(f, lo: int, hi: int):
    """The engine's Forward over rows [lo, hi): views of their state, the same cache and weights."""
    view = copy.copy(f)
    for name in PER_ROW:
        setattr(view, name, getattr(f, name)[lo:hi])
    return view


def capture(fn, pool) -> torch.cuda.CUDAGraph:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, stream=side):
        fn()
    return graph


def replay_ms(graph, reps: int = 100) -> float:
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def in_parts(f, batch: int, length: int, k: int):
    rows = batch // k
    parts = [part(f, i * rows, (i + 1) * rows) for i in range(k)]
    streams = [torch.cuda.Stream() for _ in range(k)]

    def run():
        here = torch.cuda.current_stream()
        for s, p in zip(streams, parts):
            s.wait_stream(here)
            with torch.cuda.stream(s):
                p.step(rows, length, 1.0)
        for s in streams:
            here.wait_stream(s)

    return run, parts[0]


def main():
    tok = char_tokenizer()
    print(torch.cuda.get_device_name(), torch.__version__)
    for shape, batch, positions in CASES:
        model = build(shape)
        prompts = torch.randint(3, model.config.vocab_size, (batch, 128), generator=torch.Generator().manual_seed(0)).tolist()
        eng = FastEngine(model, tok)
        force_length(model, True)
        eng.generate(prompts, SamplingParams(temperature=1.0, max_tokens=max(positions) + 64, seed=0))
        f, pool = eng.fwd, torch.cuda.graph_pool_handle()
        for pos in positions:
            length = min(max(128, 1 << pos.bit_length()), f.positions)
            graphs = {"one step": capture(lambda: f.step(batch, length, 1.0), pool)}
            for k in (2, 4) if shape != "7b" else (2,):
                run, first = in_parts(f, batch, length, k)
                graphs[f"{k} parts on {k} streams"] = capture(run, pool)
                if k == 2:
                    graphs["one half alone"] = capture(lambda: first.step(batch // 2, length, 1.0), pool)
            torch.backends.cuda.preferred_blas_library("cublaslt")
            graphs["one step, cuBLASLt"] = capture(lambda: f.step(batch, length, 1.0), pool)
            torch.backends.cuda.preferred_blas_library("cublas")
            for name, graph in graphs.items():
                at_position(f, batch, pos)
                print(f"{shape:5} {batch:4} rows at {pos:4}: {name:22} {replay_ms(graph):6.2f} ms", flush=True)
        eng.release()
        del eng, model, f
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
