"""ponder's Triton product for the decode step (ponder.kernels.skinny_linear), run by Triton's CPU interpreter in a
child process: against a float64 product computed here, with the inner dimension in one part and in several (the
last part's program sums them), and through the fast engine (rollout.engine_options.products: triton).
The interpreter mishandles bfloat16 (Triton 3.9), so these run in float16 and float32."""

import sys

import torch

# (rows, out, in, bias, (BM, BN, BK, SPLIT) or None for the default choice): rows short of a tile, an inner
# dimension that is not a multiple of BK, parts of unequal length, and the default on a shape it splits
CASES = [(5, 70, 100, True, (16, 32, 32, 1)), (5, 70, 200, True, (16, 32, 32, 3)), (33, 130, 256, False, (64, 32, 32, 4)),
         (64, 96, 190, True, (64, 64, 32, 2)), (16, 64, 4096, True, None)]


DTYPES = ((torch.float32, 1e-5), (torch.float16, 2e-3))  # (dtype, tolerance)


def operands(kernel: str, i: int, dtype):
    """x, w, b of case i: for "swiglu" a joined gate|up weight of twice the case's columns and no bias."""
    rows, n, k, bias, _ = CASES[i]
    if kernel == "swiglu":
        n, bias, i = 2 * n, False, 10 + i
    g = torch.Generator().manual_seed(i)
    x, w = torch.randn((rows, k), generator=g), torch.randn((n, k), generator=g) / k**0.5
    b = torch.randn(n, generator=g) if bias else None
    return x.to(dtype), w.to(dtype), None if b is None else b.to(dtype)


def interpreted(kernel: str, tmp_path, run, timeout: int = 200) -> dict:
    """The child's results for `kernel` (products, swiglu or engine), run under Triton's interpreter."""
    out = tmp_path / "out.pt"
    done = run([__file__, kernel, str(out)], timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out)


def check_kernel(got: dict, kernel: str, want):
    """Each case's output against want(x, w, b) (float64, rounded to the dtype); the counters left zeroed."""
    for dtype, tol in DTYPES:
        for i, (rows, n, *_) in enumerate(CASES):
            y = got[str(dtype)][i]
            assert y.shape == (rows, n) and y.dtype == dtype
            torch.testing.assert_close(y.double(), want(*operands(kernel, i, dtype)).double(), atol=tol, rtol=tol)
    assert got["counters"] == 0  # every split launch reset its tiles' counters


def test_product_matches_float64_and_leaves_the_counters_zeroed(tmp_path, triton_interpreter):
    from ponder.kernels.skinny_linear import config

    assert config(16, 64, 4096, 132)[3] == 16  # the default case above is one that splits

    def want(x, w, b):
        return torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double()).to(x.dtype)

    check_kernel(interpreted("products", tmp_path, triton_interpreter), "products", want)


def test_swiglu_epilogue_matches_the_product_then_swiglu(tmp_path, triton_interpreter):
    """skinny_swiglu(x, gate|up) = silu(g) * u of the two halves' products, each rounded to the dtype first (as the
    product's output is before the separate SwiGLU kernel reads it), in one part and in several."""

    def want(x, w, _):
        g, u = torch.nn.functional.linear(x.double(), w.double()).to(x.dtype).double().chunk(2, -1)
        return (g * torch.sigmoid(g) * u).to(x.dtype)

    check_kernel(interpreted("swiglu", tmp_path, triton_interpreter), "swiglu", want)


def test_engine_with_triton_products_generates_as_with_torchs(tmp_path, triton_interpreter):
    """Greedy tokens of a float16 Qwen2 (q/k/v biases) through the fast engine: products 'triton' (the kernel, made
    the CPU's choice for the test) against 'torch'; and the kernel ran each decode step's four products a layer
    (gate|up with SwiGLU in its epilogue: counted as two)."""
    got = interpreted("engine", tmp_path, triton_interpreter, timeout=300)
    assert got["triton"] == got["torch"]
    assert (got["triton reported"], got["torch reported"]) == ("triton", "torch")  # what bench/grpo_step.py prints
    steps, layers = got["steps"], 2
    assert got["calls"] >= 4 * layers * steps and got["fused"] >= layers * steps


def test_products_option_is_checked_and_named_where_it_cannot_run(capsys):
    import pytest

    from ponder.errors import UserError
    from ponder.models import load
    from ponder.rollout import SamplingParams
    from ponder.rollout.fast import FastEngine

    model, tok = load("tiny-random", seed=1)
    with pytest.raises(UserError, match="products must be 'torch' or 'triton', got 'cublas'"):
        FastEngine(model, tok, products="cublas")
    eng = FastEngine(model, tok, products="triton")
    eng.generate([tok.encode("12+3=")], SamplingParams(n=2, temperature=0, max_tokens=3))
    assert "products 'triton' runs on CUDA only; using torch's products here" in capsys.readouterr().err
    assert eng.stats["products"] == "torch"


def _child_kernel(kernel: str, path):
    from ponder.kernels.skinny_linear import _counter_buffer, skinny_linear, skinny_swiglu

    got = {}
    for dtype, _ in DTYPES:
        got[str(dtype)] = []
        for i, (*_, cfg) in enumerate(CASES):
            x, w, b = operands(kernel, i, dtype)
            cfg = None if cfg is None else (*cfg, 4)
            got[str(dtype)].append(skinny_swiglu(x, w, cfg) if kernel == "swiglu" else skinny_linear(x, w, b, cfg))
    got["counters"] = int(_counter_buffer(torch.device("cpu")).abs().sum())
    torch.save(got, path)


def _child_engine(path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from ponder.kernels import skinny_linear as sk
    from ponder.models.tiny import char_tokenizer
    from ponder.rollout import SamplingParams, fast_model
    from ponder.rollout.fast import FastEngine

    tok = char_tokenizer()
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=256,
                                         initializer_range=0.2, pad_token_id=0, eos_token_id=2))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.3)
    model = model.half().eval()
    calls, fused = [0], [0]

    def counted(x, w, b=None):
        calls[0] += 1
        return sk.skinny_linear(x, w, b)

    def counted_swiglu(x, w):
        calls[0] += 2  # the gate|up product and the SwiGLU after it
        fused[0] += 1
        return sk.skinny_swiglu(x, w)

    fast_model.linear_fn = lambda device: counted  # the CUDA choice, made on the CPU for the test
    fast_model.skinny_swiglu = counted_swiglu
    prompts = [tok.encode(p) for p in ("Q: 12+7=", "a", "The quick brown fox")]
    params = SamplingParams(n=2, temperature=0, max_tokens=6)
    got = {"steps": 5}
    for products in ("torch", "triton"):
        eng = FastEngine(model, tok, products=products, sync_every=2, min_bucket=1)
        got[products] = [c.token_ids for out in eng.generate(prompts, params) for c in out]
        got[products + " reported"] = eng.stats["products"]
    got["calls"], got["fused"] = calls[0], fused[0]
    torch.save(got, path)


if __name__ == "__main__":  # the child, under Triton's interpreter
    if sys.argv[1] == "engine":
        _child_engine(sys.argv[2])
    else:
        _child_kernel(sys.argv[1], sys.argv[2])
