"""Hooks: the residual-stream identities hold, reading changes nothing, hooks never leak."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from labkit.hooks import ActivationCache, capture, hook_points, kv_head_of, n_hooks, patch, run_with_cache


@pytest.fixture(scope="module")
def tiny():
    """A random 2-layer Llama with GQA (4 q heads / 2 kv heads): small for test speed, no download."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    cfg._attn_implementation = "eager"
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 97, (2, 11))
    return model, ids


def test_residual_stream_identities_hold(tiny):
    model, ids = tiny
    _, cache = run_with_cache(model, ids)
    for i in range(2):
        pre, attn, mid = (cache[f"blocks.{i}.{k}"] for k in ("hook_resid_pre", "hook_attn_out", "hook_resid_mid"))
        mlp, post = cache[f"blocks.{i}.hook_mlp_out"], cache[f"blocks.{i}.hook_resid_post"]
        assert pre.shape == (2, 11, 64)
        torch.testing.assert_close(mid, pre + attn, msg=f"layer {i}: resid_mid != resid_pre + attn_out")
        torch.testing.assert_close(post, mid + mlp, msg=f"layer {i}: resid_post != resid_mid + mlp_out")
    torch.testing.assert_close(cache["blocks.1.hook_resid_pre"], cache["blocks.0.hook_resid_post"])
    torch.testing.assert_close(cache["blocks.0.hook_resid_pre"], cache["hook_embed"])


def test_pattern_and_z_shapes_and_gqa(tiny):
    model, ids = tiny
    _, cache = run_with_cache(model, ids, ["attn.hook_pattern", "attn.hook_z"])
    pat = cache["blocks.0.attn.hook_pattern"]
    assert pat.shape == (2, 4, 11, 11)                       # [batch, head, q, k]
    torch.testing.assert_close(pat.sum(-1), torch.ones(2, 4, 11))
    assert pat.triu(1).abs().max() == 0, "causal: no weight on future keys"
    assert cache["blocks.1.attn.hook_z"].shape == (2, 11, 4, 16)   # [batch, pos, head, d_head]
    assert kv_head_of(model.config) == [0, 0, 1, 1]
    # GQA made explicit: q heads 0 and 1 read the same keys, so their patterns differ only via queries
    k = model.model.layers[0].self_attn.k_proj.weight
    assert k.shape[0] == 2 * 16, "two kv heads of 16 dims"


def test_reading_changes_nothing(tiny):
    model, ids = tiny
    with torch.no_grad():
        plain = model(ids).logits
    logits, cache = run_with_cache(model, ids)   # every hook attached
    assert torch.equal(plain, logits), "capturing must not change the logits"
    assert len(cache) == 1 + 7 * 2 and n_hooks(model) == 0
    assert all(t.device.type == "cpu" and not t.requires_grad for t in cache.values())


def test_hooks_removed_after_an_exception(tiny):
    model, ids = tiny
    with pytest.raises(RuntimeError, match="boom"):
        with capture(model) as cache:
            model(ids)
            raise RuntimeError("boom")
    assert n_hooks(model) == 0
    with pytest.raises(ValueError, match="inside"):
        with patch(model, {"blocks.0.hook_mlp_out": lambda x, n: (_ for _ in ()).throw(ValueError("inside"))}):
            model(ids)
    assert n_hooks(model) == 0, "a failing patch must not leave hooks behind"
    assert len(cache) > 0


def test_names_filter_forms(tiny):
    model, ids = tiny
    names = list(hook_points(model))
    assert set(run_with_cache(model, ids, "hook_resid_post")[1]) == {"blocks.0.hook_resid_post", "blocks.1.hook_resid_post"}
    assert set(run_with_cache(model, ids, "blocks.1.hook_resid_post")[1]) == {"blocks.1.hook_resid_post"}
    assert set(run_with_cache(model, ids, ["hook_embed", "blocks.0.hook_mlp_out"])[1]) == {"hook_embed", "blocks.0.hook_mlp_out"}
    assert len(run_with_cache(model, ids, lambda n: n.startswith("blocks.0."))[1]) == 7
    assert len(run_with_cache(model, ids, None)[1]) == len(names)
    with pytest.raises(ValueError, match="matches no hook"):
        run_with_cache(model, ids, "hook_resid_psot")


def test_patch_ablation_matches_manual_and_is_undone(tiny):
    model, ids = tiny
    with torch.no_grad():
        before = model(ids).logits
        with patch(model, {"blocks.1.hook_mlp_out": lambda x, n: torch.zeros_like(x)}):
            ablated = model(ids).logits
        after = model(ids).logits
    _, cache = run_with_cache(model, ids)
    # zeroing the last MLP means the final norm reads resid_mid of block 1
    manual = model.lm_head(model.model.norm(cache["blocks.1.hook_resid_mid"]))
    torch.testing.assert_close(ablated, manual)
    assert torch.equal(before, after) and not torch.equal(before, ablated)
    # zeroing every head through hook_z == zeroing attn_out (o_proj has no bias in Llama)
    with torch.no_grad(), patch(model, {"blocks.0.attn.hook_z": lambda z, n: torch.zeros_like(z)}):
        z0 = model(ids).logits
    with torch.no_grad(), patch(model, {"blocks.0.hook_attn_out": lambda a, n: torch.zeros_like(a)}):
        a0 = model(ids).logits
    torch.testing.assert_close(z0, a0)
    with pytest.raises(ValueError, match="cannot be patched"):
        with patch(model, {"blocks.0.attn.hook_pattern": lambda p, n: p}):
            pass


def test_safetensors_round_trip(tiny, tmp_path):
    model, ids = tiny
    _, cache = run_with_cache(model, ids, "attn.hook_pattern")
    cache.metadata["model"] = "tiny-llama"
    back = ActivationCache.load(cache.save(tmp_path / "runs" / "p.safetensors"))
    assert set(back) == set(cache) and back.metadata["model"] == "tiny-llama"
    assert all(torch.equal(back[k], cache[k]) for k in cache)
    assert back.stack("attn.hook_pattern").shape == (2, 2, 4, 11, 11)


def test_sdpa_attention_says_how_to_fix(tiny):
    model, ids = tiny
    model.config._attn_implementation = "sdpa"
    try:
        with pytest.raises(RuntimeError, match="attn_implementation='eager'"):
            run_with_cache(model, ids, "attn.hook_pattern")
    finally:
        model.config._attn_implementation = "eager"
    assert n_hooks(model) == 0


def test_embedded_smollm2_identities_and_gqa():
    from labkit.models import load_model
    model, tok = load_model()
    ids = tok("HAMLET.\nTo be, or not to be, that is the question.", return_tensors="pt").input_ids
    with torch.no_grad():
        plain = model(ids).logits
    logits, cache = run_with_cache(model, ids, lambda n: n.startswith(("blocks.29.", "blocks.7.")))
    assert torch.equal(plain, logits)
    for i in (7, 29):
        c = lambda k: cache[f"blocks.{i}.{k}"]
        torch.testing.assert_close(c("hook_resid_mid"), c("hook_resid_pre") + c("hook_attn_out"))
        torch.testing.assert_close(c("hook_resid_post"), c("hook_resid_mid") + c("hook_mlp_out"))
    assert cache["blocks.7.attn.hook_pattern"].shape == (1, 9, ids.shape[1], ids.shape[1])
    assert kv_head_of(model.config) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert n_hooks(model) == 0


def test_a_model_with_its_own_hook_points_plugs_in():
    """The labkit GPT will define hook_points(); any model that does needs no change here."""
    from torch import nn
    from labkit.hooks import HookSite

    class TinyResidual(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.mlp = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            x = x + self.attn(x)
            return x + self.mlp(x)

        def hook_points(self):
            return {"blocks.0.hook_attn_out": HookSite(self.attn, "output"),
                    "blocks.0.hook_mlp_out": HookSite(self.mlp, "output"),
                    "blocks.0.hook_resid_mid": HookSite(self.mlp, "input", 0, patchable=False)}

    m, x = TinyResidual(), torch.randn(2, 3, 4)
    with capture(m, "hook_attn_out") as cache:
        m(x)
    torch.testing.assert_close(cache["blocks.0.hook_attn_out"], m.attn(x).detach())
    with patch(m, {"blocks.0.hook_mlp_out": lambda v, n: torch.zeros_like(v)}):
        torch.testing.assert_close(m(x), x + m.attn(x))
    assert n_hooks(m) == 0
