"""The labkit GPT: equal to HF Llama (tiny random and real SmolLM2), equal to SDPA, causal, hookable."""
from dataclasses import replace

import pytest
import torch

from labkit.gpt import GPT, GPTConfig, KVCache, MoE, apply_rope, rope_cos_sin
from labkit.hooks import capture

TINY = GPTConfig(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32)
VARIANTS = {
    "gpt2": {},
    "llama": dict(pos="rope", norm="rmsnorm", act="swiglu", n_kv_head=2),
    "mqa-alibi": dict(pos="alibi", n_kv_head=1, act="relu"),
    "window-sinusoidal": dict(pos="sinusoidal", window=5),
    "moe-none": dict(pos="none", ffn="moe", n_experts=4, top_k=2),
}


def tokens(T=24, seed=0, B=2, V=97):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", VARIANTS)
def test_sdpa_path_equals_the_written_out_formula(variant):
    torch.manual_seed(0)
    manual = GPT(replace(TINY, attn_impl="manual", **VARIANTS[variant])).eval()
    sdpa = GPT(replace(TINY, attn_impl="sdpa", **VARIANTS[variant])).eval()
    sdpa.load_state_dict(manual.state_dict())
    idx = tokens()
    with torch.no_grad():
        diff = (manual(idx)[0] - sdpa(idx)[0]).abs().max().item()
    assert diff < 1e-5, f"{variant}: manual attention and SDPA differ by {diff:.2e}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_future_tokens_never_change_past_logits(variant):
    torch.manual_seed(0)
    model = GPT(replace(TINY, **VARIANTS[variant])).eval()
    idx = tokens(T=16)
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 97
    with torch.no_grad():
        a, b = model(idx)[0], model(changed)[0]
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6), "a later token changed an earlier prediction"
    assert not torch.allclose(a[:, 10:], b[:, 10:]), "the changed tokens should change their own logits"


def test_pattern_hook_sees_causal_windowed_rows_that_sum_to_one():
    model = GPT(replace(TINY, window=4)).eval()
    with torch.no_grad(), capture(model, "blocks.1.attn.hook_pattern") as cache:
        model(tokens(T=12))
    p = cache["blocks.1.attn.hook_pattern"]                         # (B, nh, T, T)
    assert p.shape == (2, 4, 12, 12)
    assert torch.allclose(p.sum(-1), torch.ones(2, 4, 12), atol=1e-6)
    i, j = torch.meshgrid(torch.arange(12), torch.arange(12), indexing="ij")
    assert (p[..., (j > i) | (i - j >= 4)] == 0).all(), "future keys and keys outside the window get 0"


def test_residual_stream_hooks_add_up():
    model = GPT(TINY).eval()
    cache = {}
    names = ["blocks.0.hook_resid_pre", "blocks.0.hook_attn_out", "blocks.0.hook_resid_mid",
             "blocks.0.hook_mlp_out", "blocks.0.hook_resid_post"]
    handles = [model.get_submodule(n).register_forward_hook(
        lambda m, i, o, n=n: cache.__setitem__(n, o)) for n in names]
    with torch.no_grad():
        model(tokens())
    for h in handles:
        h.remove()
    pre, attn, mid, mlp, post = (cache[n] for n in names)
    assert torch.allclose(mid, pre + attn) and torch.allclose(post, mid + mlp)


def test_rope_scores_depend_only_on_the_offset():
    cos, sin = rope_cos_sin(64, 16, 10000.0)
    q, k = torch.randn(16), torch.randn(16)
    def score(m, n):
        return (apply_rope(q, cos[m], sin[m]) * apply_rope(k, cos[n], sin[n])).sum()
    assert torch.allclose(score(10, 7), score(40, 37), atol=1e-4)
    assert not torch.allclose(score(10, 7), score(10, 2), atol=1e-4)


def test_moe_balancing_loss_is_one_when_balanced_and_n_experts_when_collapsed():
    moe = MoE(replace(TINY, ffn="moe", n_experts=4, top_k=1))
    x = torch.randn(2, 64, 32)
    with torch.no_grad():
        moe.router.weight.zero_()                       # uniform router: ties pick expert 0...
        moe(x)
        assert moe.counts.sum() == 128
        moe.router.weight.zero_()
        moe.router.weight[2] = 0.0
        moe.router.weight[2, 0] = 1e4                   # expert 2 wins wherever x[..., 0] > 0
        x[..., 0] = x[..., 0].abs() + 1
        moe(x)
    assert moe.counts.tolist() == [0, 0, 128, 0]
    assert abs(moe.aux_loss.item() - 4.0) < 1e-3, f"collapsed routing should cost n_experts, got {moe.aux_loss}"


def test_bad_configs_and_lengths_fail_clearly():
    with pytest.raises(ValueError, match=r"GPTConfig.pos='rotary': use one of"):
        GPTConfig(pos="rotary")
    with pytest.raises(ValueError, match="n_head by n_kv_head"):
        GPTConfig(n_head=4, n_kv_head=3)
    with pytest.raises(ValueError, match="exceeds block_size=32"):
        GPT(TINY)(tokens(T=40))
    logits, _ = GPT(replace(TINY, pos="rope"))(tokens(T=40))   # relative schemes extrapolate
    assert logits.shape == (2, 40, 97)


def tiny_llama(tie: bool):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
                      rms_norm_eps=1e-5, tie_word_embeddings=tie, attn_implementation="eager")
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("tie", [True, False])
def test_from_hf_equals_a_tiny_random_llama(tie):
    hf = tiny_llama(tie)
    ours = GPT.from_hf(hf)
    idx = tokens(T=20)
    with torch.no_grad():
        diff = (hf(idx).logits - ours(idx)[0]).abs().max().item()
    assert diff < 1e-5, f"logits differ by {diff:.2e}"


def test_from_hf_equals_smollm2_logits_and_32_greedy_tokens():
    import labkit
    hf, tok = labkit.load_model("smollm2-135m")
    ours = GPT.from_hf(hf)
    ids = tok("To be, or not to be, that is the question:", return_tensors="pt").input_ids
    with torch.no_grad():
        diff = (hf(ids).logits - ours(ids)[0]).abs().max().item()
        theirs = hf.generate(ids, max_new_tokens=32, do_sample=False)
    assert diff <= 1e-3, f"logits max-abs-diff {diff:.2e} > 1e-3"
    assert torch.equal(ours.generate(ids, 32, temperature=0), theirs), "greedy tokens diverge within 32 steps"


def test_labkit_hooks_capture_and_patch_the_gpt_by_name():
    from labkit.hooks import capture, patch
    model = GPT(replace(TINY, **VARIANTS["llama"])).eval()
    idx = tokens()
    with torch.no_grad(), capture(model, ["hook_resid_pre", "hook_attn_out", "hook_resid_mid",
                                          "attn.hook_pattern"]) as cache:
        clean = model(idx)[0]
    assert torch.allclose(cache["blocks.1.hook_resid_mid"],
                          cache["blocks.1.hook_resid_pre"] + cache["blocks.1.hook_attn_out"])
    assert cache["blocks.0.attn.hook_pattern"].shape == (2, 4, 24, 24)
    with torch.no_grad(), patch(model, {"blocks.1.hook_mlp_out": lambda x, name: torch.zeros_like(x)}):
        ablated = model(idx)[0]
    assert not torch.allclose(clean, ablated)
    with torch.no_grad():
        # close, not bit-equal: hooking the pattern ran the written-out attention, this runs SDPA
        assert torch.allclose(model(idx)[0], clean, atol=1e-5), "hooks must be gone after the with-block"
    assert not any(m._forward_hooks for m in model.modules()), "a hook was left behind"


def test_attn_mask_makes_an_encoder_or_a_prefix_lm_and_both_paths_agree():
    torch.manual_seed(0)
    manual = GPT(replace(TINY, attn_impl="manual", pos="rope")).eval()
    sdpa = GPT(replace(TINY, pos="rope")).eval()
    sdpa.load_state_dict(manual.state_dict())
    idx, T, prefix = tokens(T=16), 16, 6
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    prefix_lm = (j <= i) | (j < prefix)                 # bidirectional over the prefix, causal after
    changed = idx.clone()
    changed[:, 3] = (changed[:, 3] + 1) % 97            # a token inside the prefix
    with torch.no_grad():
        for mask in (torch.ones(T, T, dtype=torch.bool), prefix_lm):
            assert (manual(idx, attn_mask=mask)[0] - sdpa(idx, attn_mask=mask)[0]).abs().max() < 1e-5
        causal = manual(changed)[0][:, :3] - manual(idx)[0][:, :3]
        encoder = (manual(changed, attn_mask=torch.ones(T, T, dtype=torch.bool))[0]
                   - manual(idx, attn_mask=torch.ones(T, T, dtype=torch.bool))[0])[:, :3]
        prefixed = (manual(changed, attn_mask=prefix_lm)[0] - manual(idx, attn_mask=prefix_lm)[0])
    assert causal.abs().max() == 0, "causal: position 3 is invisible to positions 0-2"
    assert encoder.abs().max() > 1e-4, "encoder: every position sees position 3"
    assert prefixed[:, :3].abs().max() > 1e-4, "prefix LM: the prefix is bidirectional"


def test_changing_rope_theta_on_a_built_model_changes_its_output():
    """The RoPE tables are cached per length; editing cfg.rope_theta must not reuse stale ones."""
    torch.manual_seed(0)
    model = GPT(replace(TINY, pos="rope")).eval()
    idx = tokens()
    with torch.no_grad():
        before = model(idx)[0]
        model.cfg.rope_theta = 100.0
        after = model(idx)[0]
        model.cfg.rope_theta = 10000.0
        restored = model(idx)[0]
    assert not torch.allclose(before, after) and torch.equal(before, restored)


# ----------------------------------------------------------------------------- KV cache

def decode_with_cache(model, idx, prefill: int, cache: KVCache, chunk: int = 1):
    """Logits for every position of idx: the first ``prefill`` tokens at once, then ``chunk`` at a time."""
    out = [model(idx[:, :prefill], cache=cache)[0]]
    for t in range(prefill, idx.shape[1], chunk):
        out.append(model(idx[:, t:t + chunk], cache=cache)[0])
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("chunk", [1, 3])
def test_cached_decoding_equals_the_full_forward(variant, chunk):
    torch.manual_seed(0)
    model = GPT(replace(TINY, **VARIANTS[variant])).eval()
    idx = tokens(T=20)
    with torch.no_grad():
        full = model(idx)[0]
        cached = decode_with_cache(model, idx, 7, KVCache(model.cfg, 2, max_len=20), chunk)
    assert (full - cached).abs().max() < 1e-5, f"{variant}: cached decoding differs"


def test_a_left_padded_batch_equals_each_prompt_alone():
    torch.manual_seed(0)
    model = GPT(replace(TINY, **VARIANTS["llama"])).eval()
    short, long = tokens(T=5, seed=1, B=1), tokens(T=9, seed=2, B=1)
    batch = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), long])   # (2, 9)
    pad_mask = batch.new_ones(batch.shape, dtype=torch.bool)
    pad_mask[0, :4] = False
    nxt = tokens(T=3, seed=3)                                       # 3 more tokens per row
    with torch.no_grad():
        cache = KVCache(model.cfg, 2, max_len=12)
        first = model(batch, cache=cache, pad_mask=pad_mask)[0][:, -1]
        rest = torch.cat([model(nxt[:, [t]], cache=cache)[0] for t in range(3)], 1)
        for row, prompt in enumerate((short, long)):
            alone = model(torch.cat([prompt, nxt[[row]]], 1))[0]    # (1, T + 3, V)
            assert (alone[0, prompt.shape[1] - 1] - first[row]).abs().max() < 1e-5, f"row {row}: prefill"
            assert (alone[0, -3:] - rest[row]).abs().max() < 1e-5, f"row {row}: decoding after padding"


@pytest.mark.parametrize("pos", ["rope", "alibi", "learned"])
def test_a_ring_buffer_cache_equals_masked_sliding_window_attention(pos):
    """A cache that keeps only the last W positions = a model whose attention is masked to a window W."""
    torch.manual_seed(0)
    windowed = GPT(replace(TINY, pos=pos, window=6)).eval()
    full_attention = GPT(replace(TINY, pos=pos)).eval()
    full_attention.load_state_dict(windowed.state_dict())
    idx = tokens(T=24)
    with torch.no_grad():
        want = windowed(idx)[0]                                     # masked, no cache
        ring = decode_with_cache(windowed, idx, 10, KVCache(windowed.cfg, 2, max_len=24, window=6))
        ring_full = decode_with_cache(full_attention, idx, 10, KVCache(full_attention.cfg, 2, max_len=24, window=6))
        chunks = decode_with_cache(windowed, idx, 4, KVCache(windowed.cfg, 2, max_len=24, window=6), chunk=5)
    cache = KVCache(windowed.cfg, 2, max_len=24, window=6)
    assert cache.k.shape[3] == 6, "the ring holds window slots, not max_len"
    for name, got in (("ring", ring), ("ring, full-attention model", ring_full), ("ring, chunks of 5", chunks)):
        assert (want - got).abs().max() < 1e-5, f"{pos} {name}: differs from masked sliding-window attention"


def test_cache_misuse_fails_clearly():
    model = GPT(replace(TINY, pos="rope")).eval()
    cache = KVCache(model.cfg, 2, max_len=8)
    with pytest.raises(ValueError, match="KV cache full.*larger max_len"):
        model(tokens(T=9), cache=cache)
    with pytest.raises(ValueError, match="pad_mask has shape"):
        model(tokens(T=4), cache=KVCache(model.cfg, 2, max_len=8), pad_mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="pass cache=KVCache"):
        model(tokens(T=4), pad_mask=torch.ones(2, 4, dtype=torch.bool))


def test_token_ids_outside_the_vocabulary_fail_clearly():
    model = GPT(TINY)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 97\).*max 97.*tokenizer"):
        model(torch.tensor([[1, 2, 97]]))
    with pytest.raises(ValueError, match="min -1"):
        model(torch.tensor([[-1, 2]]))


def test_num_params_excludes_every_embedding_table_tied_or_not():
    blocks_only = sum(p.numel() for p in GPT(TINY).blocks.parameters()) + sum(p.numel() for p in GPT(TINY).ln_f.parameters())
    for tie in (True, False):
        model = GPT(replace(TINY, tie_embeddings=tie))
        assert model.num_params() == blocks_only, f"tie_embeddings={tie}"
        tables = 97 * 32 * (1 if tie else 2) + 32 * 32                  # wte (+ lm_head) + wpe
        assert model.num_params(non_embedding=False) == blocks_only + tables


def tiny_hf(kind: str):
    import transformers as tf
    config_cls, model_cls = {"qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
                             "mistral": (tf.MistralConfig, tf.MistralForCausalLM)}[kind]
    torch.manual_seed(0)
    cfg = config_cls(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
                     tie_word_embeddings=False, sliding_window=5 if kind == "mistral" else None)
    cfg._attn_implementation = "eager"
    model = model_cls(cfg).eval()
    with torch.no_grad():                  # HF initialises biases to 0: make dropping one visible
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("kind", ["qwen2", "mistral"])
def test_from_hf_equals_tiny_random_qwen2_and_mistral(kind):
    """Qwen2 has biases on q, k, v (not o); this Mistral has a sliding window of 5 (sequence of 20)."""
    hf = tiny_hf(kind)
    ours = GPT.from_hf(hf)
    assert ours.cfg.qkv_bias == (kind == "qwen2") and ours.cfg.window == (5 if kind == "mistral" else None)
    idx = tokens(T=20)
    with torch.no_grad():
        diff = (hf(idx).logits - ours(idx)[0]).abs().max().item()
    assert diff < 1e-5, f"{kind}: logits differ by {diff:.2e}"


def test_from_run_rebuilds_a_trained_gpt_and_refuses_a_damaged_or_foreign_run(tmp_path):
    from labkit.runs import CheckpointError, Run
    from labkit.train import TrainConfig, train

    class Data:                                            # any token stream will do
        def batch(self, split, batch_size, block_size, generator):
            x = torch.randint(0, 97, (batch_size, block_size + 1), generator=generator)
            return x[:, :-1], x[:, 1:]

    cfg = replace(TINY, pos="rope", bias=True, tie_embeddings=False)
    torch.manual_seed(0)
    model = GPT(cfg)
    run = Run.create(tmp_path, "gpt")
    train(model, Data(), TrainConfig(steps=3, batch_size=2, block_size=16, eval_every=3, eval_batches=1), run=run)
    again = GPT.from_run(run.path)
    assert again.cfg == cfg and not again.training
    ids = tokens(T=16)
    assert torch.equal(again(ids)[0], model.eval()(ids)[0]), "the rebuilt GPT must compute what was trained"
    weights = next(run.checkpoint_dir.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-8] + b"damaged!")
    with pytest.raises(CheckpointError, match="damaged.*earlier"):
        GPT.from_run(run.path)
    other = Run.create(tmp_path, "lstm")
    other.write_config(model_config={"d_hidden": 8}, model_class="LSTMBaseline")
    with pytest.raises(CheckpointError, match="'LSTMBaseline', not a labkit GPT"):
        GPT.from_run(other.path)
    with pytest.raises(CheckpointError, match="no config.json"):
        GPT.from_run(Run.create(tmp_path, "empty").path)
