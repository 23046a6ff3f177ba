"""The split-KV decode attention kernel (run by Triton's CPU interpreter) against a plain softmax attention
computed here, over a paged cache (rows' slots scattered over blocks; slots never written hold NaN, so a
read past a row's live slots or through a wrong table entry shows) with mixed live lengths per row."""

import sys

import torch

from ponder.kernels import decode_attention as da


def by_hand(q, k, v, pos, scale):
    """Per row and head, softmax over slots 0..pos of q.k, in float64 loops: independent of the module."""
    batch, n_kv, group, dim = q.shape
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b in range(batch):
        n = int(pos[b]) + 1
        for h in range(n_kv):
            kk, vv = k[b, h, :n].double(), v[b, h, :n].double()
            for g in range(group):
                w = torch.softmax(kk @ q[b, h, g].double() * scale, 0)
                out[b, h, g] = w @ vv
    return out


def cache_views(batch, n_kv, group, dim, rows=6, positions=160, length=150, seed=0):
    """q and k/v views cut from a [layers, 2, rows, kv heads, positions, dim] cache: each row's slots in order."""
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn((2, 2, rows, n_kv, positions, dim), generator=g)
    q = torch.randn((batch, n_kv, group, dim), generator=g)
    return q, kv[1, 0, :batch, :, :length], kv[1, 1, :batch, :, :length]


def paged(k, v, block=16, seed=0):
    """The same slots scattered over a pool of blocks [blocks, kv heads, block, dim] (block 0 left unused, as the
    engine keeps it for the sink), with each row's block table."""
    batch, n_kv, length, dim = k.shape
    per_row = -(-length // block)
    order = torch.randperm(batch * per_row, generator=torch.Generator().manual_seed(seed)) + 1
    table = order.view(batch, per_row)
    pools = []
    for c in (k, v):
        pool = torch.full((batch * per_row + 1, n_kv, block, dim), float("nan"))  # slots never written: NaN
        padded = torch.nn.functional.pad(c, (0, 0, 0, per_row * block - length), value=float("nan"))
        pool[table.reshape(-1)] = padded.view(batch, n_kv, per_row, block, dim).transpose(1, 2).reshape(-1, n_kv, block, dim)
        pools.append(pool)
    return pools[0], pools[1], table


POS = torch.tensor([0, 149, 127, 128, 64])  # one slot, all 150, and tile edges for tiles of 32, 64 and 128


def test_reference_is_softmax_attention_over_the_live_slots():
    q, k, v = cache_views(5, 2, 3, 24)
    ref = da.reference(q, k, v, POS, 0.3)
    torch.testing.assert_close(ref.double(), by_hand(q, k, v, POS, 0.3), atol=1e-5, rtol=1e-5)
    # slots past pos do not matter
    k2, v2 = k.clone(), v.clone()
    k2[0, :, 1:] = 1e4
    v2[2, :, 128:] = -1e4
    torch.testing.assert_close(da.reference(q, k2, v2, POS, 0.3), ref)


def test_gather_reads_each_rows_slots_through_its_block_table():
    q, k, v = cache_views(5, 2, 3, 24)
    kp, vp, table = paged(k, v)
    torch.testing.assert_close(da.gather(kp, table, 150), k)
    torch.testing.assert_close(da.gather(vp, table, 150), v)


def test_on_cpu_decode_attention_is_the_reference_and_takes_flat_heads():
    q, k, v = cache_views(5, 2, 7, 64)
    kp, vp, table = paged(k, v)
    out = da.decode_attention(q, kp, vp, table, POS, 0.125, 150)
    torch.testing.assert_close(out, da.reference(q, k, v, POS, 0.125))
    flat = da.decode_attention(q.reshape(5, 14, 64), kp, vp, table, POS, 0.125, 150)
    assert flat.shape == (5, 14, 64)
    torch.testing.assert_close(flat, out.reshape(5, 14, 64))


def test_float32_queries_over_a_bf16_cache_are_rounded_to_it_first():
    """Qwen3's q_norm over a float32 master's norm weights gives float32 queries beside the bf16 rollout cache
    (it failed on CUDA: the kernel's products take one dtype). They are rounded as autocast rounds SDPA's inputs."""
    q, k, v = cache_views(5, 2, 7, 64)
    kp, vp, table = paged(k, v)
    out = da.decode_attention(q, kp.bfloat16(), vp.bfloat16(), table, POS, 0.125, 150)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, da.reference(q.bfloat16(), k.bfloat16(), v.bfloat16(), POS, 0.125))


SCALES = torch.tensor([0.5, 4.0])  # an fp8 cache's K and V scales: it holds K / 0.5 and V / 4


def test_an_fp8_cache_is_read_in_the_products_dtype():
    """kv_dtype fp8: the cache holds K and V divided by their scales, in e4m3; attention is the reference over them
    widened to `dtype` (queries too) and times the scales, not over the values before rounding."""
    q, k, v = cache_views(5, 2, 7, 64)
    kp, vp, table = paged(k, v)
    f8 = torch.float8_e4m3fn
    out = da.decode_attention(q, (kp / 0.5).to(f8), (vp / 4).to(f8), table, POS, 0.125, 150, torch.float32, SCALES)
    assert out.dtype == torch.float32
    want = da.reference(q, (k / 0.5).to(f8).float() * 0.5, (v / 4).to(f8).float() * 4, POS, 0.125)
    torch.testing.assert_close(out, want)
    assert (out - da.reference(q, k, v, POS, 0.125)).abs().max() > 1e-3  # the rounding shows


def test_plan_splits_only_when_rows_leave_multiprocessors_idle():
    cpu = torch.device("cpu")  # counts 4 "multiprocessors" off CUDA
    assert da.plan(256, 2, 640, cpu) == (1, 640)  # 512 (row, kv head) programs: no split
    assert da.plan(2, 2, 640, cpu) == (1, 640)
    assert da.plan(1, 2, 640, cpu) == (3, 256)  # 2 programs: 4 splits wanted, 5 tiles: 2 tiles each
    assert da.plan(1, 1, 4096, cpu) == (8, 512)
    assert da.plan(1, 1, 100, cpu) == (1, 128)  # never less than a tile a split
    for batch, length in [(1, 1), (1, 129), (3, 1000)]:
        splits, chunk = da.plan(batch, 1, length, cpu)
        assert chunk % da.TILE == 0 and (splits - 1) * chunk < length <= splits * chunk


# (group, head dim, splits, tile, cache dtype): float32 queries, as the interpreter's products run in float32;
# an fp8 cache (kv_dtype fp8, scaled by SCALES): its products in float16 (queries and weights rounded to it: a
# looser tolerance)
CASES = [(7, 64, 1, 128, None), (7, 64, 3, 32, None), (1, 64, 2, 64, None), (3, 24, 2, 128, None),
         (7, 64, 1, 128, torch.float8_e4m3fn), (7, 64, 3, 32, torch.float8_e4m3fn)]


def rounded(t, dtype, scale):
    """t as a cache of `dtype` with this scale holds it, in float32 (None: as it is)."""
    return t if dtype is None else (t / scale).to(dtype).float() * scale


def test_triton_kernel_matches_attention_by_hand(tmp_path, triton_interpreter):
    """Triton's interpreter must be switched on before Triton is imported: the kernel runs in a child process."""
    out = tmp_path / "out.pt"
    done = triton_interpreter([__file__, str(out)], timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    results = torch.load(out)
    for (group, dim, splits, _, dtype), got in zip(CASES, results):
        q, k, v = cache_views(5, 2, group, dim, seed=group + splits)
        assert got.shape == q.shape and got.dtype == q.dtype
        want = by_hand(q, rounded(k, dtype, 0.5), rounded(v, dtype, 4.0), POS, dim**-0.5)
        tol = 1e-5 if dtype is None else 1e-3
        torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)
        if dtype is not None:  # closer to the rounded cache than to the values before rounding
            assert (got.double() - by_hand(q, k, v, POS, dim**-0.5)).abs().max() > 10 * (got.double() - want).abs().max()


if __name__ == "__main__":  # the child: run the interpreted kernel on every case, save the outputs
    outs = []
    for group, dim, splits, tile, dtype in CASES:
        q, k, v = cache_views(5, 2, group, dim, seed=group + splits)
        kp, vp, table = paged(k, v, block=16 if tile != 32 else 8, seed=tile)
        scales = None
        if dtype is not None:
            kp, vp, scales = (kp / SCALES[0]).to(dtype), (vp / SCALES[1]).to(dtype), SCALES
        outs.append(da.triton_attention(q, kp, vp, table, POS, dim**-0.5, 150, splits=splits, block_n=tile, kv_scale=scales))
    torch.save(outs, sys.argv[1])
