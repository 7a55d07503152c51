"""Hooks: the residual-stream identities hold on every supported family, reading changes nothing,
hooks never leak, one protocol for HF models and the labkit GPT."""

import pytest
import torch
import transformers as tf
from transformers import LlamaConfig, LlamaForCausalLM

from labkit.gpt import GPT
from labkit.hooks import (LAYOUTS, ActivationCache, UnsupportedModelError, capture, hook_points, kv_head_of,
                          n_hooks, patch, run_with_cache)

# One tiny random model per supported family (no download): 3 layers, 4 query / 2 KV heads.
TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
FAMILIES = {  # model_type: (config class, model class, extra config)
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {}),
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM, {}),
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {}),
    "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, {"head_dim": 16}),
    "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM, {"head_dim": 16}),
    "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM, {"head_dim": 16}),
    "gemma3_text": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, {"head_dim": 16}),
    "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, {}),
    "olmo2": (tf.Olmo2Config, tf.Olmo2ForCausalLM, {}),
}


def tiny_family(kind: str):
    config_cls, model_cls, extra = FAMILIES[kind]
    torch.manual_seed(0)
    cfg = config_cls(**TINY, **extra)
    cfg._attn_implementation = "eager"
    return model_cls(cfg).eval(), torch.randint(3, 97, (2, 11), generator=torch.Generator().manual_seed(1))


def test_every_listed_layout_is_tested_here():
    assert set(LAYOUTS) - {"gemma3"} == set(FAMILIES), "a layout without a test (or a test without a layout)"


@pytest.mark.parametrize("kind", FAMILIES)
def test_residual_identities_hold_on_each_family(kind):
    """The names mean the same thing on every family, whatever its norms do (Gemma 2/3 and OLMo 2
    normalise each sublayer's output; Phi-3 fuses q, k, v): checked against HF's own hidden_states."""
    model, ids = tiny_family(kind)
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    logits, cache = run_with_cache(model, ids)
    assert torch.equal(logits, out.logits), "capturing must not change the logits"
    c = lambda i, name: cache[f"blocks.{i}.{name}"]
    L = model.config.num_hidden_layers
    torch.testing.assert_close(c(0, "hook_resid_pre"), cache["hook_embed"])
    torch.testing.assert_close(c(0, "hook_resid_pre"), out.hidden_states[0])
    for i in range(L):
        torch.testing.assert_close(c(i, "hook_resid_mid"), c(i, "hook_resid_pre") + c(i, "hook_attn_out"),
                                   msg=f"{kind} layer {i}: resid_mid != resid_pre + attn_out")
        torch.testing.assert_close(c(i, "hook_resid_post"), c(i, "hook_resid_mid") + c(i, "hook_mlp_out"),
                                   msg=f"{kind} layer {i}: resid_post != resid_mid + mlp_out")
        if i < L - 1:   # HF's last hidden state is taken after the final norm
            torch.testing.assert_close(c(i, "hook_resid_post"), out.hidden_states[i + 1])
            torch.testing.assert_close(c(i + 1, "hook_resid_pre"), c(i, "hook_resid_post"))
    torch.testing.assert_close(model.model.norm(c(L - 1, "hook_resid_post")), out.hidden_states[-1])
    assert n_hooks(model) == 0


@pytest.mark.parametrize("kind", FAMILIES)
def test_attention_and_mlp_internals_fit_together_on_each_family(kind):
    """hook_z = pattern @ v with each query head reading its GQA key/value head; o_proj(hook_z) is
    what attention wrote (before a sandwich/post norm); down_proj(mlp.hook_post) is the MLP's output."""
    model, ids = tiny_family(kind)
    _, cache = run_with_cache(model, ids)
    layer = model.model.layers[1]
    c = lambda name: cache[f"blocks.1.{name}"]
    q, k, v, z = c("attn.hook_q"), c("attn.hook_k"), c("attn.hook_v"), c("attn.hook_z")
    assert q.shape == z.shape == (2, 11, 4, 16) and k.shape == v.shape == (2, 11, 2, 16)
    pattern = c("attn.hook_pattern")                                       # [B, head, q, k]
    torch.testing.assert_close(pattern.sum(-1), torch.ones(2, 4, 11))
    assert pattern.triu(1).abs().max() == 0, "causal: no weight on future keys"
    v_per_head = v[:, :, kv_head_of(model.config)]                         # [B, T, head, d_head]
    torch.testing.assert_close(z, torch.einsum("bhqk,bkhd->bqhd", pattern, v_per_head))
    with torch.no_grad():
        written = layer.self_attn.o_proj(z.flatten(-2))
        mlp_written = layer.mlp.down_proj(c("mlp.hook_post"))
        if hasattr(layer, "post_feedforward_layernorm"):   # Gemma 2/3, OLMo 2: norm, then add
            written, mlp_written = layer.post_attention_layernorm(written), layer.post_feedforward_layernorm(mlp_written)
    torch.testing.assert_close(written, c("hook_attn_out"))
    torch.testing.assert_close(mlp_written, c("hook_mlp_out"))


@pytest.mark.parametrize("kind", ["gemma2", "olmo2", "phi3"])
def test_patching_attn_out_works_on_each_layout(kind):
    """Zeroing what attention writes leaves resid_mid == resid_pre, whatever the layout."""
    model, ids = tiny_family(kind)
    with capture(model, ["blocks.1.hook_resid_pre", "blocks.1.hook_resid_mid"]) as cache, \
            patch(model, {"blocks.1.hook_attn_out": lambda a, n: torch.zeros_like(a)}), torch.no_grad():
        model(ids)
    torch.testing.assert_close(cache["blocks.1.hook_resid_mid"], cache["blocks.1.hook_resid_pre"])
    assert n_hooks(model) == 0


@pytest.mark.parametrize("kind", FAMILIES)
def test_patching_any_name_with_its_own_value_changes_nothing(kind):
    """Each patchable name's view and its way back are inverse (Gemma 3's per-head q/k norms, Qwen3's)."""
    model, ids = tiny_family(kind)
    points = hook_points(model)
    with torch.no_grad():
        clean = model(ids).logits
        for name in (n for n, p in points.items() if p.patchable and n.startswith("blocks.1.")):
            with patch(model, {name: lambda x, n: x.clone()}):
                assert torch.equal(model(ids).logits, clean), f"{kind}: patching {name} with itself changed the logits"
            with patch(model, {name: lambda x, n: x + 1.0}):
                assert not torch.equal(model(ids).logits, clean), f"{kind}: patching {name} had no effect"
    assert n_hooks(model) == 0


def test_an_unchecked_architecture_gets_one_clear_error():
    """Granite scales each residual write by residual_multiplier: a Llama map would be silently wrong."""
    torch.manual_seed(0)
    cfg = tf.GraniteConfig(**TINY, residual_multiplier=0.5)
    granite = tf.GraniteForCausalLM(cfg).eval()
    with pytest.raises(UnsupportedModelError, match="model_type='granite'.*supported: gemma, gemma2"):
        run_with_cache(granite, torch.randint(3, 97, (1, 5)))
    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=97, n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(UnsupportedModelError, match="olmo2, phi3, qwen2, qwen3"):
        hook_points(gpt2)
    assert n_hooks(granite) == 0


def test_the_labkit_gpt_speaks_the_same_protocol():
    """run_with_cache works on the GPT; its names are the HF adapter's (plus what only it can show:
    RoPE'd q/k and pre-softmax scores); the pattern switches SDPA to the formula only while hooked."""
    hf_model, ids = tiny_family("llama")
    gpt = GPT.from_hf(hf_model)
    hf_logits, hf_cache = run_with_cache(hf_model, ids)
    logits, cache = run_with_cache(gpt, ids)
    assert (logits - hf_logits).abs().max() < 1e-5
    extra = {n.split(".")[-1] for n in set(cache) - set(hf_cache)}
    assert set(hf_cache) <= set(cache) and extra == {"hook_rot_q", "hook_rot_k", "hook_attn_scores"}
    for name in hf_cache:
        torch.testing.assert_close(cache[name], hf_cache[name], atol=1e-5, rtol=1e-4, msg=name)
    assert gpt.cfg.attn_impl == "sdpa" and all(b.attn._written_out == 0 for b in gpt.blocks)
    with capture(gpt, "blocks.0.attn.hook_pattern"):
        assert gpt.blocks[0].attn._written_out == 1 and gpt.blocks[1].attn._written_out == 0
    assert gpt.blocks[0].attn._written_out == 0 and n_hooks(gpt) == 0


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


def test_reading_changes_nothing(tiny):
    model, ids = tiny
    with torch.no_grad():
        plain = model(ids).logits
    logits, cache = run_with_cache(model, ids)   # every hook attached
    assert torch.equal(plain, logits), "capturing must not change the logits"
    assert len(cache) == 1 + 11 * 2 and n_hooks(model) == 0
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
    assert len(run_with_cache(model, ids, lambda n: n.startswith("blocks.0."))[1]) == 11
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
