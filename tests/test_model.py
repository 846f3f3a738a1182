"""Behaviour of the model family users rely on: causality, GQA, KV cache, MoE, sizing, training."""
import pytest
import torch

from model import ConfigError, KVCache, ModelConfig, Transformer, flops_per_token, param_counts


def small(**kw):
    base = dict(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("pos", ["rope", "nope"])
def test_causal_future_tokens_never_change_past_logits(pos):
    torch.manual_seed(0)
    m = Transformer(small(pos_encoding=pos)).eval()
    x = torch.randint(0, 97, (2, 16))
    y = x.clone()
    y[:, 10:] = torch.randint(0, 97, (2, 6))
    with torch.no_grad():
        a, b = m(x).logits, m(y).logits
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_gqa_with_all_kv_heads_equals_plain_multihead_attention():
    torch.manual_seed(0)
    cfg = small(n_kv_heads=4)
    m = Transformer(cfg).eval()
    attn = m.layers[0].self_attn
    x = torch.randn(2, 12, 64)
    with torch.no_grad():
        ours = attn(x, None, None)
        mha = torch.nn.MultiheadAttention(64, 4, bias=False, batch_first=True)
        mha.in_proj_weight.copy_(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
        mha.out_proj.weight.copy_(attn.o_proj.weight)
        mask = torch.ones(12, 12, dtype=torch.bool).triu(1)
        ref, _ = mha(x, x, x, attn_mask=mask, need_weights=False)
    assert torch.allclose(ours, ref, atol=1e-5)


@pytest.mark.parametrize("kv", [1, 2, 4])
def test_kv_cache_decoding_equals_full_forward(kv):
    torch.manual_seed(0)
    m = Transformer(small(n_kv_heads=kv)).eval()
    x = torch.randint(0, 97, (3, 20))
    cache = KVCache(m.cfg, 3)
    with torch.no_grad():
        full = m(x).logits
        parts = [m(x[:, :7], cache=cache).logits, m(x[:, 7:12], cache=cache).logits]
        parts += [m(x[:, i:i + 1], cache=cache).logits for i in range(12, 20)]
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)


def test_nope_and_rope_differ_and_both_train():
    torch.manual_seed(0)
    x = torch.randint(0, 97, (2, 16))
    for pos in ("rope", "nope"):
        m = Transformer(small(pos_encoding=pos))
        out = m(x, x)
        out.loss.backward()
        assert torch.isfinite(out.loss)
        assert m.embed_tokens.weight.grad is not None


def test_param_counts_match_module():
    for cfg in [small(), small(tie_embeddings=False), small(n_experts=4, top_k=2),
                small(n_experts=4, top_k=1, shared_expert=True), small(n_kv_heads=1, ffn_hidden=100)]:
        m = Transformer(cfg)
        counts = param_counts(cfg)
        assert counts["total"] == sum(p.numel() for p in m.parameters())
        emb = m.embed_tokens.weight.numel() + (0 if cfg.tie_embeddings else m.lm_head.weight.numel())
        assert counts["embedding"] == emb
        if cfg.is_moe:
            assert counts["active"] < counts["total"]
        else:
            assert counts["active"] == counts["total"]


def test_flops_per_token_grows_with_size_and_context():
    a, b = small(), small(n_layers=4)
    assert flops_per_token(b) > flops_per_token(a)
    assert flops_per_token(a, 64) > flops_per_token(a, 16)
    n = param_counts(a)["active_non_embedding"] + a.vocab_size * a.d_model
    assert flops_per_token(a, 16) == 6 * n + 12 * 2 * 4 * 16 * 16


def test_moe_routing_respects_top_k():
    torch.manual_seed(0)
    cfg = small(n_experts=4, top_k=2)
    m = Transformer(cfg).train()
    x = torch.randint(0, 97, (2, 16))
    m(x, x)
    counts = m.layers[0].mlp.load_counts
    assert counts.sum().item() == 2 * 16 * cfg.top_k  # every token picks exactly top_k experts
    assert (counts <= 2 * 16).all()                     # and never the same expert twice


def test_loss_free_bias_moves_load_toward_balance():
    torch.manual_seed(0)
    cfg = small(n_experts=4, top_k=1, bias_update_rate=0.02)
    moe = Transformer(cfg).train().layers[0].mlp
    with torch.no_grad():  # a deliberately skewed router: expert 0 wins for every token
        moe.router.weight.normal_(0, 0.1)
        moe.router.weight[0] += 0.25
    x = torch.randn(8, 32, 64) + 0.5

    def shares():
        moe.load_counts.zero_()
        moe(x)
        return moe.load_counts / moe.load_counts.sum()

    before = shares()
    for _ in range(60):
        moe(x)
        moe.update_bias(cfg.bias_update_rate)
    after = shares()
    assert before.max() > 0.95
    assert after.max() < 0.35 and after.min() > 0.15
    assert moe.route_bias[0] < 0 and (moe.route_bias[1:] > 0).all()


def test_aux_loss_mode_returns_positive_loss():
    torch.manual_seed(0)
    m = Transformer(small(n_experts=4, top_k=2, balance="aux_loss")).train()
    x = torch.randint(0, 97, (2, 16))
    out = m(x, x)
    assert out.aux_loss is not None and out.aux_loss.item() > 0
    plain = torch.nn.functional.cross_entropy(out.logits.view(-1, 97), x.view(-1))
    assert out.loss.item() > plain.item()


def test_activation_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    a = Transformer(small())
    b = Transformer(small(activation_checkpointing=True))
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 97, (2, 16))
    a(x, x).loss.backward()
    b(x, x).loss.backward()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-6)


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    m = Transformer(small())
    x = torch.randint(0, 97, (4, 24))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        loss = m(x[:, :-1], x[:, 1:]).loss
        first = first or loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first / 10


@pytest.mark.parametrize("kwargs, field", [
    (dict(d_model=66, n_heads=4), "d_model"),
    (dict(n_heads=4, n_kv_heads=3), "n_kv_heads"),
    (dict(n_experts=2, top_k=3), "top_k"),
    (dict(d_model=60, n_heads=4, head_dim=15), "head_dim"),
    (dict(pos_encoding="alibi"), "pos_encoding"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(n_layers=-1), "n_layers"),
    (dict(n_experts=4, balance="magic"), "balance"),
    (dict(rope_theta=0), "rope_theta"),
])
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        small(**kwargs)


def test_unknown_config_key_is_named():
    with pytest.raises(ConfigError, match="d_modle"):
        ModelConfig.from_dict({"d_modle": 64})
