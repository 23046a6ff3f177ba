import pytest
import torch

from ponder.errors import UserError
from ponder.models import load
from ponder.rl.logprobs import token_logprobs


def reference(model, ids, att, temperature=1.0):
    """Full-vocabulary reference: log p(ids[t] | ids[:t]) and entropy, [B, L], 0 at t = 0."""
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=att, position_ids=pos).logits.float() / temperature
    logp = logits.log_softmax(-1)
    lp = logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)[:, :-1]
    pad = torch.zeros(ids.shape[0], 1)
    return torch.cat([pad, lp], 1), torch.cat([pad, ent], 1)


@pytest.fixture(scope="module")
def batch():
    model, _ = load("tiny-random-micro", seed=3)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, model.config.vocab_size, (3, 11), generator=g)
    att = torch.ones_like(ids)
    att[0, 8:] = 0  # right padding
    att[1, :3] = 0  # left padding
    comp = torch.zeros_like(ids)
    comp[0, 5:8] = 1
    comp[1, 6:] = 1
    comp[2, 2:] = 1
    return model, ids, att, comp


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_values_and_entropy_match_full_logits_with_padding_and_chunks(batch, temperature):
    model, ids, att, comp = batch
    ref_lp, ref_ent = reference(model, ids, att, temperature)
    lp, ent = token_logprobs(model, ids, att, comp, temperature=temperature, chunk_size=4)
    assert lp.shape == ids.shape and lp.dtype == torch.float32
    m = comp.bool()
    torch.testing.assert_close(lp[m], ref_lp[m], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent[m], ref_ent[m], atol=1e-5, rtol=1e-5)
    assert (lp[~m] == 0).all() and (ent[~m] == 0).all()
    assert not ent.requires_grad


def test_gradients_match_full_logits(batch):
    model, ids, att, comp = batch
    weights = torch.linspace(0.5, 2.0, ids.numel()).reshape(ids.shape) * comp
    ref_lp, _ = reference(model, ids, att)
    model.zero_grad()
    (ref_lp * weights).sum().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    lp, _ = token_logprobs(model, ids, att, comp, chunk_size=3)
    (lp * weights).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], atol=1e-5, rtol=1e-4, msg=n)
    model.zero_grad()


def test_entropy_is_computed_once_per_chunk_not_again_in_backward(batch, monkeypatch):
    """Backward recomputes each chunk's logits (checkpointing) but must not redo the entropy."""
    model, ids, att, comp = batch
    import ponder.rl.logprobs as logprobs_module

    calls = []
    entropy = logprobs_module.softmax_entropy

    def counting(x, lse):
        calls.append(1)
        return entropy(x, lse)

    monkeypatch.setattr(logprobs_module, "softmax_entropy", counting)
    scored = int(((comp[:, 1:] != 0) & (att[:, 1:] != 0)).sum())  # 17 tokens: 5 chunks of at most 4
    lp, ent = token_logprobs(model, ids, att, comp, chunk_size=4)
    assert len(calls) == -(-scored // 4) == 5
    lp.sum().backward()
    assert len(calls) == 5 and ent is not None
    model.zero_grad()


def test_positions_form_gathers_the_same_values(batch):
    model, ids, att, comp = batch
    lp_mask, _ = token_logprobs(model, ids, att, comp)
    positions = torch.tensor([[5, 6, 7], [6, 8, 10], [2, 3, 9]])
    lp, ent = token_logprobs(model, ids, att, positions=positions, with_entropy=False)
    assert ent is None and lp.shape == (3, 3)
    torch.testing.assert_close(lp, lp_mask.gather(1, positions))


def test_user_mistakes_are_named(batch):
    model, ids, att, comp = batch
    with pytest.raises(UserError, match="temperature must be > 0"):
        token_logprobs(model, ids, att, comp, temperature=0)
    with pytest.raises(UserError, match="positions must be >= 1"):
        token_logprobs(model, ids, att, positions=torch.zeros(3, 2, dtype=torch.long))


def test_shared_prefix_forward_equals_the_full_forward():
    """A template shared by every row is run once and broadcast; values and gradients are unchanged."""
    import ponder.rl.forward as F
    from ponder.models import load
    from ponder.rl.batching import Sample, to_tensors

    model, tok = load("tiny-random-micro")
    g = torch.Generator().manual_seed(0)
    template = torch.randint(4, 100, (60,), generator=g).tolist()
    samples = []
    for q in range(3):
        prompt = template + torch.randint(4, 100, (3 + q,), generator=g).tolist()
        for _ in range(2):
            n = int(torch.randint(1, 9, (1,), generator=g))
            samples.append(Sample(prompt, torch.randint(4, 100, (n,), generator=g).tolist()))
    t = to_tensors(samples, tok.pad_token_id, torch.device("cpu"))
    results = []
    for min_prefix in (32, 10**9):  # shared-prefix path, then the plain one
        F.MIN_SHARED_PREFIX, old = min_prefix, F.MIN_SHARED_PREFIX
        try:
            model.zero_grad()
            lp, ent = F.completion_logprobs(model, t, with_entropy=True)
        finally:
            F.MIN_SHARED_PREFIX = old
        (lp * t.mask).sum().backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        results.append((lp * t.mask, ent * t.mask, grads))
    (lp_a, ent_a, g_a), (lp_b, ent_b, g_b) = results
    assert torch.allclose(lp_a, lp_b, atol=1e-5)
    assert torch.allclose(ent_a, ent_b, atol=1e-5)
    assert torch.allclose(g_a, g_b, atol=1e-5, rtol=1e-4)
    from ponder.rl.logprobs import shared_prefix_length

    assert shared_prefix_length(t.input_ids, t.attention_mask) == 60


TINY = dict(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.3, pad_token_id=0, bos_token_id=1,
            eos_token_id=2)


@pytest.mark.parametrize("kind, extra", [("gemma2", dict(head_dim=8, final_logit_softcapping=3.0, attn_implementation="eager")),
                                         ("granite", dict(logits_scaling=8.0)), ("cohere", dict(logit_scale=0.0625))])
def test_log_probs_are_the_models_own_where_its_forward_transforms_the_logits(kind, extra):
    """Gemma 2 caps its logits, Granite divides them, Cohere scales them, after the output layer: the log-probs (from
    the output layer, chunk by chunk) were those of another distribution than the one sampled and trained."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **TINY, **extra)).eval()
    ids = torch.randint(3, 101, (2, 9))
    with torch.no_grad():
        want = model(ids).logits[:, :-1].float().div(0.7).log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
        got, _ = token_logprobs(model, ids, temperature=0.7)
    torch.testing.assert_close(got[:, 1:], want, atol=1e-5, rtol=1e-5)


def test_a_forward_that_changes_the_logits_unknown_ways_is_refused(monkeypatch):
    from transformers import AutoConfig, AutoModelForCausalLM

    from ponder.rl import logprobs

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("granite", **TINY, logits_scaling=8.0))
    monkeypatch.setattr(logprobs, "logit_transform", lambda m: None)  # as an architecture not in the table
    with pytest.raises(UserError, match=r"^model type 'granite': its forward changes the output layer's logits"):
        token_logprobs(model, torch.randint(3, 101, (1, 5)))


def test_the_logits_probe_leaves_training_mode_and_the_random_state_alone():
    """check_head runs once in the first scoring pass of a run, on a model in training mode: it must leave it in training
    mode, and the run's random state as it was (eval mode draws no dropout; the state is also forked around it)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ponder.rl.logprobs import check_head

    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **TINY, attention_dropout=0.5)).train()
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    check_head(model)
    assert torch.equal(torch.rand(4), expected) and model.training


def test_the_entropy_of_a_qwen_sized_vocabulary_is_float32_exact():
    """Both heads' entropies (the fused head's torch path and the padded pass's) at a 151,936-token vocabulary
    against float64: lse - sum(softmax * x) was 1e-3 off on the CPU, the size of a real entropy change in a step."""
    from ponder.kernels.head_logprobs import _torch_stats
    from ponder.rl.logprobs import head_logprobs

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 151936, generator=g) * 4
    targets = torch.randint(0, 151936, (8,), generator=g)
    x = logits.double()
    log_p = x - x.logsumexp(-1, keepdim=True)
    want = -(log_p.exp() * log_p).sum(-1)
    _, lp, ent = _torch_stats(logits, targets, 1.0, True)
    assert (ent.double() - want).abs().max() < 5e-5
    assert (lp.double() - log_p.gather(-1, targets[:, None]).squeeze(-1)).abs().max() < 5e-5
    _, ent = head_logprobs(torch.nn.Identity(), logits, targets, 1.0, 4, with_entropy=True)
    assert (ent.double() - want).abs().max() < 5e-5
