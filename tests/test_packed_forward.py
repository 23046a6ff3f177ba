"""The packed training pass (ponder.rl.packed) and the fused head (ponder.kernels.head_logprobs) against the
Hugging Face forward through full logits: values, entropies and gradients. CPU, float32, small random models."""

import pytest
import torch
from transformers import (
    ArceeConfig, ArceeForCausalLM, AutoModelForCausalLM, InternLM3Config, LlamaConfig, LlamaForCausalLM,
    Ministral3Config, MinistralConfig, MinistralForCausalLM, MixtralConfig, MixtralForCausalLM, Olmo2Config,
    Olmo2ForCausalLM, Phi3Config, Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM,
    Qwen3MoeConfig, Qwen3MoeForCausalLM, SeedOssConfig, SeedOssForCausalLM, SmolLM3Config, SmolLM3ForCausalLM,
)

from random_weights import randomized

from ponder.models import enable_checkpointing
from ponder.rl.batching import Sample, micro_batches
from ponder.kernels.head_logprobs import chunks, head_logprobs
from ponder.rl.packed import (
    bucketed_attention, length_buckets, pack, packed_logprobs, packed_micro_batches, padded_attention, rows, seg_arange,
)

SMALL = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=97, max_position_embeddings=256, initializer_range=0.2, pad_token_id=0)


def build(kind):
    torch.manual_seed(0)
    if kind == "qwen2":
        return randomized(Qwen2ForCausalLM(Qwen2Config(**SMALL, tie_word_embeddings=True)))
    if kind == "qwen3":
        return randomized(Qwen3ForCausalLM(Qwen3Config(**SMALL, head_dim=24, tie_word_embeddings=False)))
    if kind == "seed_oss":  # biases on every projection; dropout off for the HF forward it is checked against (train mode)
        return randomized(SeedOssForCausalLM(SeedOssConfig(
            **SMALL, head_dim=24, attention_out_bias=True, mlp_bias=True, residual_dropout=0.0, attention_dropout=0.0,
            tie_word_embeddings=False)))
    if kind == "qwen3_moe":  # layer 0 a block of 4 experts (2 a token), layer 1 dense
        return randomized(Qwen3MoeForCausalLM(Qwen3MoeConfig(
            **SMALL, head_dim=24, moe_intermediate_size=48, num_experts=4, num_experts_per_tok=2, mlp_only_layers=[1],
            tie_word_embeddings=False)))
    if kind == "phi3":  # one qkv_proj, one gate_up_proj
        return randomized(Phi3ForCausalLM(Phi3Config(**SMALL, sliding_window=None, resid_pdrop=0.0, tie_word_embeddings=False)))
    if kind == "olmo2":  # norms after attention and the MLP; q_norm and k_norm over whole projections
        return randomized(Olmo2ForCausalLM(Olmo2Config(**SMALL, tie_word_embeddings=False)))
    if kind == "smollm3":  # layer 1 without rotary embedding (NoPE)
        return randomized(SmolLM3ForCausalLM(SmolLM3Config(**SMALL, no_rope_layers=[1, 0], tie_word_embeddings=False)))
    if kind == "ministral":
        return randomized(MinistralForCausalLM(MinistralConfig(**SMALL, head_dim=16, tie_word_embeddings=False)))
    if kind == "ministral3":  # queries scaled by position past 8
        return randomized(AutoModelForCausalLM.from_config(Ministral3Config(**SMALL, head_dim=16, rope_parameters=dict(
            rope_type="default", rope_theta=1e4, llama_4_scaling_beta=0.5, original_max_position_embeddings=8))))
    if kind == "mixtral":  # every MLP a block of 4 experts, 2 a token
        return randomized(MixtralForCausalLM(MixtralConfig(**SMALL, num_local_experts=4, num_experts_per_tok=2)))
    if kind == "internlm3":  # biases on q/k/v and on o and the MLP
        return randomized(AutoModelForCausalLM.from_config(InternLM3Config(**SMALL, qkv_bias=True, bias=True)))
    if kind == "arcee":  # a gateless ReLU-squared MLP
        return randomized(ArceeForCausalLM(ArceeConfig(**SMALL, tie_word_embeddings=False)))
    return randomized(LlamaForCausalLM(LlamaConfig(**SMALL, tie_word_embeddings=False)))


def samples():
    """Two groups sharing prompts (one of them with an empty and a one-token completion), a lone row."""
    g = torch.Generator().manual_seed(3)
    rnd = lambda n: torch.randint(1, 97, (n,), generator=g).tolist()  # noqa: E731
    p1, p2, p3 = rnd(7), rnd(3), rnd(12)
    return [Sample(p1, rnd(9)), Sample(p1, rnd(4)), Sample(p1, []), Sample(p1, rnd(1)),
            Sample(p2, rnd(15)), Sample(p2, rnd(6)), Sample(p3, rnd(2))]


def reference(model, batch, temperature=1.0):
    """Each row alone through the HF model's full logits: log-probs and entropies of its completion tokens."""
    t_max = max(max(len(s.completion_ids) for s in batch), 1)
    lp = torch.zeros(len(batch), t_max)
    ent = torch.zeros(len(batch), t_max)
    rows = []
    for i, s in enumerate(batch):
        if not s.completion_ids:
            rows.append(None)
            continue
        ids = torch.tensor([s.prompt_ids + s.completion_ids])
        logits = model(input_ids=ids).logits[0, len(s.prompt_ids) - 1 : -1].float() / temperature
        logp = logits.log_softmax(-1)
        row_lp = logp.gather(-1, torch.tensor(s.completion_ids)[:, None]).squeeze(-1)
        rows.append(row_lp)
        ent[i, : len(s.completion_ids)] = -(logp.exp() * logp).sum(-1).detach()
    lp = torch.stack([torch.cat([r, torch.zeros(t_max - len(r))]) if r is not None else torch.zeros(t_max) for r in rows])
    return lp, ent


def test_pack_by_hand():
    """Prompt [5, 6] shared by two rows, completions [1, 2, 3] and [4]: the stream is 5 6 | 1 2 (no input for
    the one-token row); keys of row 0 are the prompt then its own; token 1 is predicted by the prompt's last."""
    pk = pack([Sample([5, 6], [1, 2, 3]), Sample([5, 6], [4])], "cpu")
    assert pk.ids.tolist() == [5, 6, 1, 2]
    assert pk.pos.tolist() == [0, 1, 2, 3]
    assert pk.cu_q.tolist() == [0, 2, 4] and pk.cu_k.tolist() == [0, 2, 6]
    assert pk.key_idx.tolist() == [0, 1, 0, 1, 2, 3]
    assert (pk.max_q, pk.max_k) == (2, 4)
    assert pk.src.tolist() == [1, 2, 3, 1] and pk.targets.tolist() == [1, 2, 3, 4]
    assert pk.row.tolist() == [0, 0, 0, 1] and pk.col.tolist() == [0, 1, 2, 0]
    assert pk.mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_seg_arange():
    assert seg_arange(torch.tensor([10, 0, 5]), torch.tensor([2, 0, 3])).tolist() == [10, 11, 5, 6, 7]


def test_repeated_rows_sum_their_gradients_in_one_order_on_cpu():
    """The gathers of the pass (a prompt's keys for each of its rows) repeat rows; backward sums their gradients.
    t[idx]'s backward on CPU adds them from both threads with atomic adds, in an order that changes from call to
    call (two training runs of one seed then differed in the 8th digit); rows() gives one result every time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(0)
        t = torch.randn((400, 1, 32), generator=g, requires_grad=True)
        idx = torch.arange(400).repeat_interleave(8)[torch.randperm(3200, generator=g)]  # over 32,768 elements
        grad_out = torch.randn((3200, 1, 32), generator=g)
        assert torch.equal(rows(t, idx), t[idx])
        grads = [torch.autograd.grad(rows(t, idx), t, grad_out)[0] for _ in range(20)]
        assert all(torch.equal(grads[0], x) for x in grads)
        torch.testing.assert_close(grads[0], torch.zeros(400, 1, 32).index_put_((idx,), grad_out, accumulate=True))
    finally:
        torch.set_num_threads(threads)


def test_padded_attention_equals_attention_by_hand():
    pk = pack([Sample([5, 6, 7], [1, 2, 3]), Sample([8], [4, 4])], "cpu")
    g = torch.Generator().manual_seed(0)
    q = torch.randn(pk.ids.shape[0], 4, 8, generator=g)
    k = torch.randn(pk.ids.shape[0], 2, 8, generator=g)
    v = torch.randn(pk.ids.shape[0], 2, 8, generator=g)
    out = padded_attention(q, k[pk.key_idx], v[pk.key_idx], pk, 0.3)
    # by hand: each stream token attends to the keys of its sequence up to its own position
    seq_keys = {0: [0, 1, 2], 1: [3], 2: [0, 1, 2, 4, 5], 3: [3, 6]}  # the stream is 5 6 7 | 8 | 1 2 | 4
    want = torch.zeros_like(out)
    for tok in range(pk.ids.shape[0]):
        seg = next(s for s in range(4) if pk.cu_q[s] <= tok < pk.cu_q[s + 1])
        keys = seq_keys[seg]
        n_vis = len(keys) - (int(pk.cu_q[seg + 1]) - 1 - tok)
        kk, vv = k[keys[:n_vis]], v[keys[:n_vis]]
        for hd in range(4):
            w = (q[tok, hd] @ kk[:, hd // 2].T * 0.3).softmax(-1)
            want[tok, hd] = w @ vv[:, hd // 2]
    torch.testing.assert_close(out, want)


def test_length_buckets_group_like_lengths_and_keep_small_ones_together():
    # two long prompts (q = k = 500) and answers of 10 and 300 tokens to them (keys 510 and 800), sorted by keys.
    # The 10-token answer beside the prompts: 3 x 500 x 510 = 765,000 padded for 505,100 held, 259,900 of padding,
    # over 30% of 505,100 (151,530): a group of its own. The 300-token one beside it: 2 x 300 x 800 for 245,100,
    # 234,900 of padding over max(30% = 73,530, 65,536): its own too
    q_len, k_len = [500, 500, 10, 300], [500, 500, 510, 800]
    assert length_buckets(q_len, k_len) == [[0, 1], [2], [3]]
    # with 60% allowed the first fits (259,900 < 303,060) and the last still does not (854,900 > 447,060)
    assert length_buckets(q_len, k_len, slack=1.6) == [[0, 1, 2], [3]]
    # small segments stay in one group whatever their shapes: 65,536 pairs of padding cost less than a group
    assert length_buckets([3, 60, 1], [3, 90, 70]) == [[0, 2, 1]]


def test_bucketed_attention_equals_the_padded_reference():
    """Values and all three gradients, on a micro-batch whose lengths make several groups."""
    g = torch.Generator().manual_seed(0)
    batch = [Sample([7] * 300, [1] * 5), Sample([7] * 300, [2] * 280), Sample([9] * 20, [3] * 40), Sample([9] * 20, [4])]
    pk = pack(batch, "cpu")
    q_len, k_len = (pk.cu_q[1:] - pk.cu_q[:-1]).tolist(), (pk.cu_k[1:] - pk.cu_k[:-1]).tolist()
    assert len(length_buckets(q_len, k_len)) > 1
    n = pk.ids.shape[0]
    q = torch.randn((n, 4, 8), generator=g, requires_grad=True)
    k, v = (torch.randn((n, 2, 8), generator=g, requires_grad=True) for _ in range(2))
    w = torch.randn((n, 4, 8), generator=g)
    o1, o2 = (f(q, k[pk.key_idx], v[pk.key_idx], pk, 0.3) for f in (bucketed_attention, padded_attention))
    torch.testing.assert_close(o1, o2)
    for a, b in zip(torch.autograd.grad((o1 * w).sum(), (q, k, v)), torch.autograd.grad((o2 * w).sum(), (q, k, v))):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "arcee", "seed_oss", "qwen3_moe", "phi3", "olmo2", "smollm3",
                                  "ministral", "ministral3", "mixtral", "internlm3"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_values_entropies_and_gradients_match_the_hf_forward(kind, temperature):
    model = build(kind)
    batch = samples()
    w = torch.randn(len(batch), 15, generator=torch.Generator().manual_seed(1))
    want, want_ent = reference(model, batch, temperature)
    (want * w[:, : want.shape[1]]).sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    got, ent, mask = packed_logprobs(model, batch, "cpu", with_entropy=True, temperature=temperature)
    assert got.shape == want.shape == mask.shape
    assert mask.sum() == sum(len(s.completion_ids) for s in batch)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, want_ent, atol=1e-5, rtol=1e-5)
    (got * w[:, : got.shape[1]]).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], atol=1e-5 * float(ref_grads[n].abs().max()), rtol=1e-4, msg=n)


def test_gradient_checkpointing_gives_the_same_gradients(monkeypatch):
    import ponder.rl.packed as packed

    calls = []
    monkeypatch.setattr(packed, "checkpoint", lambda *a, **k: calls.append(1) or torch.utils.checkpoint.checkpoint(*a, **k))
    model = build("llama")
    batch = samples()
    out = []
    for on in (False, True):
        model.zero_grad()
        if on:
            enable_checkpointing(model)  # what model.gradient_checkpointing: true does
        lp, _, _ = packed_logprobs(model, batch, "cpu")
        lp.sum().backward()
        out.append([p.grad.clone() for p in model.parameters()])
    assert len(calls) == 2  # one per layer, only when switched on
    for a, b in zip(*out):
        torch.testing.assert_close(a, b)


def test_fused_head_values_and_gradients_match_autograd():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    t = torch.randint(0, 50, (37,), generator=g)
    up, up_ent = torch.randn(37, generator=g), torch.randn(37, generator=g)
    logp = ((h @ w.T) / 0.8).log_softmax(-1)
    want = logp.gather(-1, t[:, None]).squeeze(-1)
    want_ent = -(logp.exp() * logp).sum(-1)
    rh, rw = torch.autograd.grad((want * up).sum(), (h, w), retain_graph=True)
    oh = torch.autograd.grad((want_ent * up_ent).sum(), h, retain_graph=True)[0]
    eh, ew = torch.autograd.grad((want * up + want_ent * up_ent).sum(), (h, w))  # an entropy term in the loss too
    for keep in (False, True):  # logits recomputed in backward, or kept from forward
        lp, ent = head_logprobs(h, w, t, temperature=0.8, chunk_rows=10, keep=keep)
        torch.testing.assert_close(lp, want)
        torch.testing.assert_close(ent, want_ent.detach())
        assert not ent.requires_grad
        gh, gw = torch.autograd.grad((lp * up).sum(), (h, w))
        torch.testing.assert_close(gh, rh)
        torch.testing.assert_close(gw, rw)
        lp, ent = head_logprobs(h, w, t, temperature=0.8, chunk_rows=10, keep=keep, entropy_grad=True)
        gh, gw = torch.autograd.grad((lp * up + ent * up_ent).sum(), (h, w))
        torch.testing.assert_close(gh, eh, atol=1e-4, rtol=1e-4)  # float32 sums of the entropy's longer terms
        torch.testing.assert_close(gw, ew, atol=1e-4, rtol=1e-4)
        _, ent = head_logprobs(h, w, t, temperature=0.8, chunk_rows=10, keep=keep, entropy_grad=True)
        gh, gw = torch.autograd.grad((ent * up_ent).sum(), (h, w))  # the entropy alone: no gradient comes to lp
        torch.testing.assert_close(gh, oh, atol=1e-4, rtol=1e-4)


def test_kept_logits_can_live_in_lent_scratch_memory():
    """The head's first logits written into idle memory (the engine's cache between rollouts): same values
    and gradients, and the memory really holds them."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    t = torch.randint(0, 50, (37,), generator=g)
    assert chunks(37, 50, 4, 10, 25 * 50 * 4 + 7) == [(0, 25, True), (25, 35, False), (35, 37, False)]
    assert chunks(37, 50, 4, 10, 0) == [(0, 10, False), (10, 20, False), (20, 30, False), (30, 37, False)]
    want = ((h @ w.T)).log_softmax(-1).gather(-1, t[:, None]).squeeze(-1)
    rh, rw = torch.autograd.grad(want.sum(), (h, w))
    scratch = torch.zeros(25 * 50 * 4 + 7, dtype=torch.uint8)
    lp, _ = head_logprobs(h, w, t, chunk_rows=10, keep=True, scratch=scratch)
    torch.testing.assert_close(scratch[: 25 * 50 * 4].view(torch.float32).view(25, 50), (h @ w.T)[:25].detach())
    torch.testing.assert_close(lp, want)
    gh, gw = torch.autograd.grad(lp.sum(), (h, w))
    torch.testing.assert_close(gh, rh)
    torch.testing.assert_close(gw, rw)


def test_packed_micro_batches_keep_groups_together_within_the_budget():
    batch = samples()  # groups of 7 + 11, 3 + 19 and 12 + 1 stream tokens
    mbs = packed_micro_batches(batch, 25)
    assert sorted(id(s) for mb in mbs for s in mb) == sorted(id(s) for s in batch)
    for mb in mbs:  # every prompt of a micro-batch has all its rows there
        for s in mb:
            assert sum(r.prompt_ids == s.prompt_ids for r in mb) == sum(r.prompt_ids == s.prompt_ids for r in batch)
    assert [len({tuple(s.prompt_ids) for s in mb}) for mb in mbs] == [1, 1, 1]  # no two groups fit together
    assert len(packed_micro_batches(batch, 10_000)) == 1
    # a group over the budget is split by rows, each part with its prompt: 3 + 14 + 5 > 20 -> 3 + 14 and 3 + 5
    split = packed_micro_batches(batch, 20)
    assert sorted(id(s) for mb in split for s in mb) == sorted(id(s) for s in batch)
    stream = [sum(max(len(r.completion_ids) - 1, 0) for r in mb) + sum(map(len, {tuple(r.prompt_ids) for r in mb}))
              for mb in split]
    assert max(stream) <= 20 and sorted(stream) == [8, 13, 17, 18]
    # ten groups of 10 stream tokens, 60 a micro-batch: two halves, not 6 groups and a rest of 4
    even = [Sample([i], list(range(10))) for i in range(10)]
    assert [len(mb) for mb in packed_micro_batches(even, 60)] == [5, 5]
    assert len(micro_batches(batch, 10_000)) == 1


from ponder.kernels import head_logprobs as fh  # noqa: E402

TRITON_CHECK = """
import torch
from ponder.kernels import head_logprobs as fh
g = torch.Generator().manual_seed(0)
x = (torch.randn(5, 300, generator=g) * 3).to(torch.bfloat16)
t = torch.tensor([0, 299, 7, 150, 42])
gl = torch.randn(5, generator=g)
for inv_t in (1.0, 1 / 0.7):
    lse, lp, ent = fh._torch_stats(x, t, inv_t, True)
    fh._stats_kernel.fn.__globals__  # the kernel exists
    rows, vocab = x.shape
    out = [torch.empty(5) for _ in range(3)]
    fh._stats_kernel[(rows,)](x, t, *out, vocab, x.stride(0), inv_t, BLOCK=128)
    for a, b in zip(out, (lse, lp, ent)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    for with_ent in ((), (ent, gl.flip(0))):  # and with the entropy's gradient (algorithm.entropy_coef)
        ref = fh._torch_grad(x.clone(), t, lse, gl, inv_t, *with_ent)
        y = x.clone()
        fh._grad_kernel[(rows,)](y, t, lse, gl, *(with_ent or (lse, lse)), vocab, y.stride(0), inv_t, BLOCK=128,
                                 ENTROPY=bool(with_ent))
        torch.testing.assert_close(y.float(), ref.float(), atol=1e-2, rtol=1e-2)
assert fh._agrees(torch.device("cpu"))  # the trial a GPU runs before the kernels are used
fh._stats_kernel = fh._grad_kernel  # a wrong kernel in the stats' place: the trial must refuse it
try:
    assert not fh._agrees(torch.device("cpu"))
except Exception:  # or fail to launch, which the trial turns into a notice
    pass
print("ok")
"""


def test_triton_head_kernels_match_the_torch_math(triton_interpreter):
    """The Triton passes under Triton's CPU interpreter (skipped where Triton is absent, as in CI)."""
    r = triton_interpreter(["-c", TRITON_CHECK])
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


def test_a_head_kernel_that_fails_leaves_the_torch_math_with_one_notice_naming_why(monkeypatch, capsys):
    """On CUDA the Triton head passes ran untried: a Triton that fails to launch there stopped the update."""
    from ponder.kernels import trials

    def broken(*_):
        raise RuntimeError("PTX assembly aborted\nthe rest of a long compiler log")

    monkeypatch.setattr(trials, "triton", object())  # as if installed, so the trial runs
    monkeypatch.setattr(fh, "triton", object())
    monkeypatch.setattr(fh, "_triton_stats", broken)
    monkeypatch.setattr(fh, "_usable", {})
    assert not fh.triton_runs(torch.device("cpu"))
    assert capsys.readouterr().err == ("ponder: packed forward: the Triton head log-probs failed their trial; using the "
                                       "torch math (RuntimeError: PTX assembly aborted)\n")
    assert not fh.triton_runs(torch.device("cpu"))  # tried once a device
    assert capsys.readouterr().err == ""


def test_packed_on_an_unsupported_architecture_is_one_clear_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    from ponder.errors import UserError
    from ponder.rl.forward import use_packed

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(UserError, match="train.forward: packed supports the Llama family .* not 'gpt2'; use forward: padded"):
        use_packed("packed", gpt2)
    assert not use_packed("auto", gpt2)
    assert use_packed("auto", build("llama"))  # auto: packed wherever the model is supported, CPU or CUDA


def test_the_attention_trial_tells_a_wrong_kernel_from_the_reference():
    """The check a CUDA kernel passes before use (values and gradients against padded_attention)."""
    from ponder.rl.packed import _agrees

    cpu = torch.device("cpu")
    assert _agrees(padded_attention, padded_attention, cpu)
    wrong_scale = lambda q, k, v, pk, scale: padded_attention(q, k, v, pk, scale * 1.5)  # noqa: E731
    assert not _agrees(wrong_scale, padded_attention, cpu)


def test_lora_wrapped_projections_match_the_hf_forward():
    """LoRA on q and v: q, k and v run each by itself (not as one joined product), k as a plain product; values
    and the adapters' gradients still match the HF forward."""
    assert_matches_hf(lora_model("llama", ["q_proj", "v_proj"]), samples())


def test_disable_dropout_turns_off_the_models_rates_and_leaves_loras():
    """Seed-OSS's config has attention and residual dropout of 0.1, which HF's forward applies in training mode
    (the trainer's mode): scores would be noise against the rollout's. After disable_dropout the HF forward in
    training mode repeats itself and equals the packed pass; LoRA's adapter dropout keeps its rate."""
    from peft import LoraConfig, get_peft_model

    from ponder.models import disable_dropout

    torch.manual_seed(0)
    model = randomized(SeedOssForCausalLM(SeedOssConfig(**SMALL, head_dim=24, tie_word_embeddings=False)))
    assert model.training and model.config.attention_dropout == model.config.residual_dropout == 0.1
    batch = samples()
    with torch.no_grad():
        assert not torch.equal(reference(model, batch)[0], reference(model, batch)[0])
        assert disable_dropout(model) == 3 * SMALL["num_hidden_layers"]  # attention, and the residual of each half
        want = reference(model, batch)[0]
        torch.testing.assert_close(reference(model, batch)[0], want, atol=0, rtol=0)
        torch.testing.assert_close(packed_logprobs(model, batch, "cpu")[0], want, atol=1e-5, rtol=1e-5)
    lora = get_peft_model(build("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], lora_dropout=0.2))
    assert disable_dropout(lora) == 0
    assert {m.p for n, m in lora.named_modules() if isinstance(m, torch.nn.Dropout)} == {0.2}


def test_disable_dropout_turns_off_mixtrals_router_jitter():
    """Mixtral's router multiplies its input by uniform noise of +-router_jitter_noise in training mode: the
    update would score a noisy policy against the rollout's (eval mode)."""
    from ponder.models import disable_dropout

    torch.manual_seed(0)
    model = randomized(MixtralForCausalLM(MixtralConfig(**SMALL, num_local_experts=4, num_experts_per_tok=2,
                                                        router_jitter_noise=0.1)))
    batch = samples()
    with torch.no_grad():
        assert not torch.equal(packed_logprobs(model, batch, "cpu")[0], packed_logprobs(model, batch, "cpu")[0])
        assert disable_dropout(model) == SMALL["num_hidden_layers"]
        want = packed_logprobs(model, batch, "cpu")[0]
        torch.testing.assert_close(packed_logprobs(model, batch, "cpu")[0], want, atol=0, rtol=0)
        torch.testing.assert_close(reference(model.eval(), batch)[0], want, atol=1e-5, rtol=1e-5)


def lora_model(kind, targets, **kw):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build(kind), LoraConfig(r=4, lora_alpha=8, target_modules=targets, **kw))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "lora_magnitude" in n:  # B = 0 at start would make the adapters invisible
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(5))
    return model


def assert_matches_hf(model, batch):
    want, _ = reference(model, batch)
    want.sum().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    got, _, _ = packed_logprobs(model, batch, "cpu")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    got.sum().backward()
    assert ref and all("lora_" in n for n in ref)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, ref[n], atol=1e-5 * float(ref[n].abs().max()), rtol=1e-4, msg=n)


ALL_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_lora_on_every_projection_runs_as_base_plus_adapter_products(monkeypatch):
    """LoRA on all seven projections of a Qwen2 (q/k/v biases), dropout 0: the packed pass computes each layer as
    its base product plus the adapter's product added by addmm, never calling peft's forward; values and the
    adapters' gradients match the HF forward through peft's layers."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    model = lora_model("qwen2", ALL_LINEARS)
    batch = samples()
    want, _ = reference(model, batch)  # through peft's forward
    calls = []
    original = LoraLinear.forward
    monkeypatch.setattr(LoraLinear, "forward", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    got, _, _ = packed_logprobs(model, batch, "cpu")
    assert not calls
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    monkeypatch.undo()
    assert_matches_hf(model, batch)
    with torch.no_grad():  # bf16 autocast: the products' rounding, no more (peft's own way is 0.06 off here)
        bf16 = packed_logprobs(model, batch, "cpu", autocast=True)[0]
        with model.disable_adapter():
            base = packed_logprobs(model, batch, "cpu", autocast=True)[0]
    assert (bf16 - got).abs().max() < 0.15 and (base - got).abs().max() > 1


def test_lora_layers_the_fast_path_does_not_know_are_called_as_they_are(monkeypatch):
    """DoRA (its own forward) and dropout at training time go through peft's forward, and still match."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    from ponder.rl.lora_linears import adapter

    dora = lora_model("llama", ["q_proj", "gate_proj", "down_proj"], use_dora=True)
    assert all(adapter(m) is None for m in dora.modules() if isinstance(m, LoraLinear))
    assert_matches_hf(dora, samples())
    dropped = lora_model("llama", ["q_proj"], lora_dropout=0.5)
    layer = next(m for m in dropped.modules() if isinstance(m, LoraLinear))
    dropped.train()
    assert adapter(layer) is None
    dropped.eval()
    assert adapter(layer) is not None


SWIGLU_CHECK = """
import torch
from ponder.kernels.swiglu import _agrees, halves_trial, triton_swiglu, triton_swiglu_halves
assert _agrees(torch.device("cpu")) and halves_trial(torch.device("cpu"))
g, u = torch.randn(3, 5000, dtype=torch.float32), torch.randn(3, 5000, dtype=torch.float32)
assert torch.allclose(triton_swiglu(g, u), torch.nn.functional.silu(g) * u, atol=1e-5)
# the decode step's: gate|up joined in one row, rows that are a strided view (width 2 x 1,500, stride 3,001)
wide = torch.randn(4, 3001)
x = wide[:, :3000]
assert torch.allclose(triton_swiglu_halves(x), torch.nn.functional.silu(x[:, :1500]) * x[:, 1500:], atol=1e-5)
print("ok")
"""


def test_triton_swiglu_matches_the_torch_math(triton_interpreter):
    """Forward and both gradients, and the decode step's kernel over joined gate|up rows, under Triton's CPU
    interpreter."""
    r = triton_interpreter(["-c", SWIGLU_CHECK])
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


ROPE_CHECK = """
import torch
from ponder.kernels.rope import _agrees, rope, triton_rope_qk
assert _agrees(torch.device("cpu"))  # bf16, q a strided view, halves of cos/sin that differ
g = torch.Generator().manual_seed(1)
q, k = torch.randn(21, 3, 10, generator=g), torch.randn(21, 1, 10, generator=g)
ang = torch.rand(21, 1, 10, generator=g) * 6
got = triton_rope_qk(q, k, ang.cos(), ang.sin())
assert all(torch.allclose(a, rope(x, ang.cos(), ang.sin()), atol=1e-6) for a, x in zip(got, (q, k)))
print("ok")
"""


def test_triton_rotary_matches_the_torch_math(triton_interpreter):
    """Values and the gradient under Triton's CPU interpreter (skipped where Triton is absent, as in CI)."""
    r = triton_interpreter(["-c", ROPE_CHECK])
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


def test_attention_takes_one_dtype_bf16_under_cuda_autocast_and_float32_on_cpu():
    """Under CUDA autocast q, k and v go to attention in bf16, as SDPA's inputs are rounded in the HF forward: Qwen3's
    q_norm and k_norm over float32 norm weights gave float32 q and k beside a bf16 v, and all three went in as
    float32, where flash attention takes bf16 only. On CPU attention stays float32 (its bf16 backward is slow)."""
    from ponder.rl.packed import attention_dtype

    bf16, fp32 = torch.bfloat16, torch.float32
    assert attention_dtype(True, bf16, fp32) == bf16  # Qwen3's q after its float32 norm
    assert attention_dtype(True, bf16, bf16) == bf16
    assert attention_dtype(True, None, fp32) == fp32 and attention_dtype(True, None, bf16) == bf16  # no autocast
    assert attention_dtype(False, bf16, bf16) == fp32 and attention_dtype(False, bf16, fp32) == fp32
    assert attention_dtype(False, None, bf16) == bf16  # bf16 weights (train.precision=bf16): as they are


@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_attention_under_cpu_autocast_runs_float32_outside_autocast(kind, monkeypatch):
    """train.precision mixed on CPU: the products in bf16, attention on float32 q, k and v with autocast off (else
    SDPA would round them to bf16 again), and the log-probs those of the HF forward under autocast, within bf16's
    rounding."""
    import ponder.rl.packed as packed

    seen = []
    real = packed.bucketed_attention

    def attend(q, k, v, pk, scale):
        seen.append(({q.dtype, k.dtype, v.dtype}, torch.is_autocast_enabled("cpu")))
        return real(q, k, v, pk, scale)

    monkeypatch.setattr(packed, "bucketed_attention", attend)
    model = build(kind)
    batch = samples()
    got = packed_logprobs(model, batch, "cpu", autocast=True)[0]
    assert len(seen) == model.config.num_hidden_layers and all(s == ({torch.float32}, False) for s in seen), seen
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, _ = reference(model, batch)
    torch.testing.assert_close(got, want, atol=0.05, rtol=0.05)
    seen.clear()
    packed_logprobs(model, batch, "cpu")  # float32 without autocast: no change of dtype or autocast
    assert all(s == ({torch.float32}, False) for s in seen) and seen
