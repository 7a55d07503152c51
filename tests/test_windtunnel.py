"""The wind tunnel's ground truth must be exactly right: every model is graded against it."""
import math

import pytest
import torch

from labkit.windtunnel import (TunnelConfig, TunnelLSTM, TunnelMLP, TunnelTransformer, apply_rope,
                               bayes_posterior, entropy_bits, kl_bits, make_batch, rope_cos_sin,
                               to_tokens, value_logits)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("p_repeat", [0.0, 0.4])
def test_values_follow_one_bijection_per_sequence(p_repeat):
    keys, vals = make_batch(64, 8, n_pairs=12 if p_repeat else 7, p_repeat=p_repeat, generator=gen())
    for k, v in zip(keys.tolist(), vals.tolist()):
        pairs = dict()
        for a, b in zip(k, v):
            assert pairs.setdefault(a, b) == b, f"key {a} shown with two values: {pairs[a]} and {b}"
        assert len(set(pairs.values())) == len(pairs), f"two keys share a value: {pairs}"
        assert all(0 <= x < 8 for x in k + v), "ids must lie in 0..V-1"


def test_without_repeats_keys_are_distinct_and_pi_is_a_permutation():
    keys, vals = make_batch(32, 10, n_pairs=10, generator=gen(1))
    for row in (keys, vals):
        assert (row.sort(1).values == torch.arange(10)).all(), "L = V pairs must use every key and value once"


def test_generator_is_deterministic_by_seed():
    a, b, c = (make_batch(16, 20, p_repeat=0.3, generator=gen(s)) for s in (5, 5, 6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), "same seed must give the same batch"
    assert not torch.equal(a[0], c[0]), "different seeds should give different batches"


def test_posterior_is_uniform_over_unrevealed_values():
    V = 6
    keys, vals = make_batch(50, V, generator=gen(2))
    post = bayes_posterior(keys, vals, V)                                       # (B, L, V)
    assert torch.allclose(post.sum(-1), torch.ones(50, V - 1)), "each posterior must sum to 1"
    for b in range(5):
        for t in range(V - 1):
            shown = set(vals[b, :t].tolist())
            expect = torch.tensor([0.0 if v in shown else 1 / (V - t) for v in range(V)])
            assert torch.allclose(post[b, t], expect), f"seq {b} pos {t}: {post[b, t]} vs {expect}"


def test_entropy_is_log2_of_remaining_values():
    V = 20
    keys, vals = make_batch(8, V, generator=gen(3))
    h = entropy_bits(bayes_posterior(keys, vals, V))                            # (B, L)
    expect = torch.tensor([math.log2(V - t) for t in range(V - 1)])
    assert torch.allclose(h, expect.expand_as(h), atol=1e-5), f"H_Bayes(t) must be log2(V-t), got {h[0]}"


def test_repeated_key_is_certain():
    V = 5
    keys = torch.tensor([[3, 1, 3, 0, 1]])
    vals = torch.tensor([[2, 4, 2, 0, 4]])
    post = bayes_posterior(keys, vals, V)
    h = entropy_bits(post)[0]
    assert h[2].item() == 0.0 and h[4].item() == 0.0, f"repeated keys must cost 0 bits, got {h}"
    assert post[0, 2, 2] == 1.0 and post[0, 4, 4] == 1.0, "all mass on the value shown before"
    # an unseen key after two distinct values: uniform over the 3 still free
    assert abs(h[3].item() - math.log2(3)) < 1e-6, f"expected log2(3) bits, got {h[3]}"


def test_kl_is_zero_for_the_posterior_itself_and_positive_otherwise():
    keys, vals = make_batch(4, 7, generator=gen(4))
    post = bayes_posterior(keys, vals, 7)
    assert kl_bits(post, post.clamp_min(1e-30).log()).abs().max() < 1e-5
    uniform = torch.full_like(post, 1 / 7).log()
    assert (kl_bits(post, uniform)[:, 1:] > 0).all(), "ignoring the context must cost bits"


def test_tokens_interleave_keys_and_values():
    toks = to_tokens(torch.tensor([[1, 0]]), torch.tensor([[2, 3]]), n_keys=4)
    assert toks.tolist() == [[1, 6, 0, 7]]


@pytest.mark.parametrize("kind", ["transformer", "mlp", "lstm"])
def test_models_emit_value_logits_at_key_positions(kind):
    cfg = TunnelConfig(n_keys=6, n_pairs=5, n_layer=1, n_head=2, d_model=16, d_mlp=32)
    model = {"transformer": lambda: TunnelTransformer(cfg), "mlp": lambda: TunnelMLP(cfg, 32),
             "lstm": lambda: TunnelLSTM(cfg, 16)}[kind]()
    keys, vals = make_batch(3, 6, n_pairs=5, generator=gen())
    cache = {}
    out = value_logits(model, keys, vals, cache=cache)
    assert out.shape == (3, 5, 6), f"expected (B, L, V) = (3, 5, 6), got {tuple(out.shape)}"
    if kind == "transformer":
        assert cache["blocks.0.attn.hook_pattern"].shape == (3, 2, 10, 10)
        assert torch.allclose(model.lens(cache["blocks.0.hook_resid_post"])[:, 0::2], out)


def test_transformer_is_causal():
    cfg = TunnelConfig(n_keys=6, n_pairs=5, n_layer=2, n_head=2, d_model=16, d_mlp=32)
    model = TunnelTransformer(cfg).eval()
    keys, vals = make_batch(2, 6, n_pairs=5, generator=gen())
    toks = to_tokens(keys, vals, 6)
    changed = toks.clone()
    changed[:, -1] = (changed[:, -1] - 6 + 1) % 6 + 6                           # alter the last value
    with torch.no_grad():
        assert torch.allclose(model(toks)[:, :-1], model(changed)[:, :-1], atol=1e-6), \
            "a later token must not change earlier predictions"


def test_rope_scores_depend_only_on_the_offset():
    # RoPE rotates q and k by angles proportional to their positions, so q_t . k_s sees t - s only
    T, d = 12, 8
    cos, sin = rope_cos_sin(T, d)                                               # (T, d) each
    q, k = torch.randn(d, generator=gen(7)), torch.randn(d, generator=gen(8))
    qs, ks = apply_rope(q.expand(T, d), cos, sin), apply_rope(k.expand(T, d), cos, sin)   # (T, d)
    scores = qs @ ks.T                                                          # (T, T) [t, s]
    for off in range(-3, 4):
        diag = scores.diagonal(-off)                                            # all (t, t - off)
        assert torch.allclose(diag, diag[0].expand_as(diag), atol=1e-5), f"offset {off}: {diag}"
    assert not torch.allclose(scores.diagonal(0)[0], scores.diagonal(-1)[0]), "offsets must matter"
    assert torch.allclose(qs.norm(dim=-1), q.norm().expand(T)), "a rotation keeps the norm"


def test_rope_matches_transformers_llama():
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    T, d = 10, 16
    cos, sin = rope_cos_sin(T, d)
    q, k = torch.randn(1, 2, T, d, generator=gen(1)), torch.randn(1, 2, T, d, generator=gen(2))
    hq, hk = llama.apply_rotary_pos_emb(q, k, cos[None], sin[None])
    assert torch.allclose(hq, apply_rope(q, cos, sin), atol=1e-6), "q rotation differs from Llama's"
    assert torch.allclose(hk, apply_rope(k, cos, sin), atol=1e-6), "k rotation differs from Llama's"


def test_rope_transformer_has_no_position_table_and_is_causal():
    cfg = TunnelConfig(n_keys=6, n_pairs=5, n_layer=2, n_head=2, d_model=16, d_mlp=32, pos="rope")
    model = TunnelTransformer(cfg).eval()
    assert model.pos_emb is None, "RoPE puts positions into attention, not into the residual"
    toks = to_tokens(*make_batch(2, 6, n_pairs=5, generator=gen()), 6)         # (2, 10)
    changed = toks.clone()
    changed[:, -1] = (changed[:, -1] - 6 + 1) % 6 + 6
    with torch.no_grad():
        assert torch.allclose(model(toks)[:, :-1], model(changed)[:, :-1], atol=1e-6)


def test_checkpoint_round_trips_and_a_damaged_one_names_the_fix(tmp_path):
    from labkit.runs import CheckpointError
    from labkit.windtunnel import load_checkpoint, save_checkpoint
    torch.manual_seed(0)
    model = TunnelTransformer(TunnelConfig(n_keys=6, n_pairs=5, n_layer=1, n_head=2, d_model=16, d_mlp=32))
    path = tmp_path / "run" / "transformer.pt"
    save_checkpoint(path, model, history={"steps_done": 3})
    assert sorted(p.name for p in path.parent.iterdir()) == ["transformer.pt"], "no temporary file may remain"
    loaded, extra = load_checkpoint(path)
    assert extra["history"]["steps_done"] == 3
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    path.write_bytes(path.read_bytes()[:100])                       # a truncated file
    with pytest.raises(CheckpointError, match="delete it and re-run D1"):
        load_checkpoint(path)
