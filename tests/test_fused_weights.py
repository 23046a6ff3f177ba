"""Joining q/k/v and gate/up into one buffer each (ponder.rollout.fused_weights): nothing the model computes,
trains or saves changes, and the joined product sees every update."""

import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from ponder.rollout.fused_weights import join, joined

CFG = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           vocab_size=50, max_position_embeddings=64)


def model():
    torch.manual_seed(0)
    m = Qwen2ForCausalLM(Qwen2Config(**CFG))
    with torch.no_grad():
        for layer in m.model.layers:  # q/k/v biases start at zero: make them count
            for p in (layer.self_attn.q_proj.bias, layer.self_attn.k_proj.bias, layer.self_attn.v_proj.bias):
                p.normal_()
    return m


def join_all(m):
    for layer in m.model.layers:
        a = layer.self_attn
        assert join([a.q_proj, a.k_proj, a.v_proj]) is not None
        assert join([layer.mlp.gate_proj, layer.mlp.up_proj]) is not None


def test_joined_product_equals_the_separate_ones_and_follows_optimizer_steps(tmp_path):
    m = model()
    ids = torch.tensor([[1, 5, 7, 9]])
    before = m(ids).logits
    params = list(m.parameters())
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    join_all(m)
    assert all(a is b for a, b in zip(params, m.parameters()))  # the same Parameter objects
    torch.testing.assert_close(m(ids).logits, before)
    a = m.model.layers[0].self_attn
    w, b = joined([a.q_proj, a.k_proj, a.v_proj])
    h = torch.randn(3, 32)
    torch.testing.assert_close(torch.nn.functional.linear(h, w, b), torch.cat([a.q_proj(h), a.k_proj(h), a.v_proj(h)], -1))
    w_before = w.clone()
    m(ids).logits.sum().backward()
    opt.step()
    w2, b2 = joined([a.q_proj, a.k_proj, a.v_proj])  # still one buffer, holding the updated values
    assert w2.data_ptr() == w.data_ptr()
    torch.testing.assert_close(w2, torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
    assert not torch.equal(w2, w_before)
    torch.testing.assert_close(b2, torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]))
    # saved and loaded like any model
    m.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(back(ids).logits, m(ids).logits)


def test_wrapped_or_mismatched_layers_are_left_alone():
    m = model()
    a = m.model.layers[0].self_attn
    ptr = a.q_proj.weight.data_ptr()
    wrapped = torch.nn.Sequential(a.k_proj)
    assert join([a.q_proj, wrapped, a.v_proj]) is None
    assert join([a.q_proj, m.model.layers[0].mlp.up_proj]) is None  # bias on one, none on the other
    assert a.q_proj.weight.data_ptr() == ptr and joined([a.q_proj, a.k_proj]) is None
