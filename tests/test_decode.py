"""labkit.decode on the labkit GPT = HF ``generate`` on SmolLM2, token for token.

Greedy: 64 new tokens identical to HF for several prompts, decoded as one left-padded batch
(each row = that prompt alone through HF), by both decode paths (``model(..., cache=)`` and the
fused ``decode_step``). Sampling: same seed, same tokens, and HF's tokens for HF's processors.
Then what ends a row (EOS, stop strings), streaming text = decoding the final ids (multi-byte
characters split over tokens), the fused step = the module path on small random models (padding,
sliding window), ``prepare_for_decode`` and ``logits_to_keep`` change nothing beyond rounding, and
int8 weights stay close to fp32 (int4 measurably less so).
"""
import copy
from dataclasses import replace

import pytest
import torch

import labkit
from labkit.decode import Detokenizer, generate, stream
from labkit.gpt import GPT, GPTConfig, KVCache
from labkit.quant import quantize_model
from labkit.sampling import SamplingConfig

PROMPTS = ["To be, or not to be, that is the question:", "The capital of France is", "def fibonacci(n):"]
N_NEW = 64
LLAMA = GPTConfig(vocab_size=97, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, pos="rope",
                  norm="rmsnorm", act="swiglu")


@pytest.fixture(scope="module")
def smollm2():
    hf, tok = labkit.load_model()
    return hf, tok, GPT.from_hf(hf).prepare_for_decode()


@pytest.fixture(scope="module")
def hf_greedy(smollm2):
    """HF generate's 64 greedy tokens for each prompt alone (no EOS stop: the full 64)."""
    hf, tok, _ = smollm2
    out = []
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            seq = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N_NEW, do_sample=False,
                              eos_token_id=None, pad_token_id=tok.eos_token_id)
        out.append(seq[0, ids.shape[1]:].tolist())
    return out


@pytest.mark.parametrize("fused", [False, True], ids=["modules", "fused step"])
def test_greedy_batch_with_left_padding_equals_hf_generate_for_each_prompt_alone(smollm2, hf_greedy, fused):
    _, tok, model = smollm2
    out = generate(model, tok, PROMPTS, N_NEW, eos_token_id=None, fused=fused)
    assert [len(p) for p in out.prompts] != [len(out.prompts[0])] * 3, "the prompts should need padding"
    for prompt, ours, theirs in zip(PROMPTS, out.tokens, hf_greedy):
        first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
        assert ours == theirs, f"{prompt!r}: first difference at new token {first} of {N_NEW}"
    assert out.finish_reasons == ["length"] * 3 and len(out.step_seconds) == N_NEW - 1
    assert out.texts == [tok.decode(t, skip_special_tokens=True) for t in out.tokens]


def test_eos_ends_a_row_and_stop_strings_end_it_in_the_text(smollm2, hf_greedy):
    _, tok, model = smollm2
    greedy = hf_greedy[2]                                             # "def fibonacci(n):" -> code
    eos = greedy[5]
    out = generate(model, tok, PROMPTS[2], N_NEW, eos_token_id=eos, fused=True)
    assert out.tokens[0] == greedy[:greedy.index(eos) + 1] and out.finish_reasons == ["eos"]
    full = tok.decode(greedy, skip_special_tokens=True)
    stop = "return"
    assert stop in full, f"the greedy continuation should contain {stop!r}: {full!r}"
    out = generate(model, tok, PROMPTS[2], N_NEW, stop=["no such text", stop], eos_token_id=None, fused=True)
    text, n = out.texts[0], len(out.tokens[0])
    assert out.finish_reasons == ["stop"] and out.tokens[0] == greedy[:n], "a stop string must not change tokens"
    assert stop in text and stop not in tok.decode(greedy[:n - 1], skip_special_tokens=True), (
        f"generation should end on the token that completes {stop!r}: {text!r}")


def test_a_row_that_finishes_stops_growing_while_the_others_continue():
    torch.manual_seed(0)
    model = GPT(LLAMA).eval()
    free = generate(model, None, [[1, 2, 3], [4, 5]], 12, eos_token_id=None)
    eos = free.tokens[1][3]                                           # row 1's 4th token ends row 1
    out = generate(model, None, [[1, 2, 3], [4, 5]], 12, eos_token_id=eos)
    cut = free.tokens[1].index(eos) + 1
    assert out.tokens[1] == free.tokens[1][:cut] and out.finish_reasons[1] == "eos"
    row0_end = free.tokens[0].index(eos) + 1 if eos in free.tokens[0] else 12
    assert out.tokens[0] == free.tokens[0][:row0_end], "another row's EOS must not change this row"


def test_detokenizer_pieces_join_to_the_decoded_text_and_never_split_a_character(smollm2):
    _, tok, _ = smollm2
    text = "Café 🙂 日本語 — naïve “quotes” 𝄞 end"
    ids = tok(text).input_ids
    assert any("\ufffd" in tok.decode([i]) for i in ids), "the test text should split a character over tokens"
    d = Detokenizer(tok)
    pieces = [d.push(i) for i in ids] + [d.flush()]
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces), f"a piece holds half a character: {pieces}"


def test_stream_yields_what_generate_returns_and_sampling_is_reproducible(smollm2):
    _, tok, model = smollm2
    hot = SamplingConfig(temperature=1.3, top_k=200)                  # varied text, multi-byte tokens likely
    kw = dict(eos_token_id=None, fused=True)
    pieces = list(stream(model, tok, "Café 🙂 日本語 means", 16, hot, seed=3, **kw))
    out = generate(model, tok, "Café 🙂 日本語 means", 16, hot, seed=3, **kw)
    assert "".join(pieces) == out.texts[0] == tok.decode(out.tokens[0], skip_special_tokens=True)
    assert len(pieces) > 1, "streaming should hand out text as it arrives, not all at the end"
    again = generate(model, tok, "Café 🙂 日本語 means", 16, hot, seed=3, **kw)
    other = generate(model, tok, "Café 🙂 日本語 means", 16, hot, seed=4, **kw)
    assert again.tokens == out.tokens and other.tokens != out.tokens, "same seed -> same text; another seed differs"


@pytest.mark.parametrize("cfg", [SamplingConfig(temperature=0.8, top_k=40, top_p=0.9, repetition_penalty=1.2),
                                 SamplingConfig(temperature=1.2, min_p=0.05)], ids=["t-k-p-penalty", "t-min_p"])
def test_sampling_equals_hf_generate_for_the_same_seed(smollm2, cfg):
    """HF draws from torch's global generator; a fresh Generator with the same seed draws the same."""
    hf, tok, model = smollm2
    ids = tok(PROMPTS[0], return_tensors="pt").input_ids
    torch.manual_seed(7)
    with torch.no_grad():
        seq = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=16,
                          temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, min_p=cfg.min_p or None,
                          repetition_penalty=cfg.repetition_penalty, eos_token_id=None, pad_token_id=tok.eos_token_id)
    out = generate(model, tok, PROMPTS[0], 16, cfg, seed=7, eos_token_id=None, fused=True)
    assert out.tokens[0] == seq[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("variant", [dict(), dict(window=5), dict(qkv_bias=True, n_kv_head=1)],
                         ids=["gqa", "sliding-window", "mqa-qkv-bias"])
def test_fused_step_equals_the_module_path_with_left_padding(variant):
    torch.manual_seed(0)
    model = GPT(replace(LLAMA, **variant)).eval()
    prompts = torch.randint(0, 97, (3, 7), generator=torch.Generator().manual_seed(1))
    pad_mask = torch.ones(3, 7, dtype=torch.bool)
    pad_mask[0, :4], pad_mask[2, :1] = False, False
    nxt = torch.randint(0, 97, (3, 12), generator=torch.Generator().manual_seed(2))
    caches = [KVCache(model.cfg, 3, max_len=20) for _ in range(2)]
    with torch.no_grad():
        for cache in caches:
            model(prompts, cache=cache, pad_mask=pad_mask)
        for t in range(12):
            want = model(nxt[:, [t]], cache=caches[0])[0][:, -1]
            got = model.decode_step(nxt[:, [t]], caches[1])
            assert (want - got).abs().max() < 1e-5, f"step {t}: fused differs by {(want - got).abs().max():.1e}"


def test_prepare_for_decode_and_logits_to_keep_change_nothing_beyond_rounding():
    torch.manual_seed(0)
    model = GPT(replace(LLAMA, n_layer=1)).eval()
    idx = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = model(idx)[0]
        model.prepare_for_decode()
        assert model.lm_head.weight is model.wte.weight, "the tied embedding must stay tied"
        assert model.blocks[0].attn.qkv.weight.t().is_contiguous()
        relaid = model(idx)[0]
        last = model(idx, logits_to_keep=1)[0]
        model.prepare_for_decode("out_in")
        assert model.blocks[0].attn.qkv.weight.is_contiguous()
    assert (relaid - before).abs().max() < 1e-5 and (last - relaid[:, -1:]).abs().max() < 1e-5
    with pytest.raises(ValueError, match="logits_to_keep with targets"):
        model(idx, idx, logits_to_keep=1)


def test_int8_stays_close_to_fp32_and_int4_drifts_measurably(smollm2, hf_greedy):
    """Fed the fp32 greedy text, how often does the quantized model pick the same next token?
    Measured on these 3 prompts x 64 tokens: int8 per-channel 98-100% (KL 0.003 nats), int4
    groups of 32 70-92% (KL 0.24-0.43): the embedded SmolLM2 is already a 4-bit model, and
    re-quantizing it to 4 bits moves it (notebook 14). Greedy *text* is a brittle measure: int8's
    first differing token came at 3..64 depending on the prompt, int4's at 0..5."""
    _, tok, model = smollm2
    ids = [torch.tensor([tok(p).input_ids + t]) for p, t in zip(PROMPTS, hf_greedy)]
    n_prompt = [len(tok(p).input_ids) for p in PROMPTS]
    agree, kl = {}, {}
    with torch.no_grad():
        fp32 = [model(x)[0][0, n - 1:-1].log_softmax(-1) for x, n in zip(ids, n_prompt)]     # (64, V) each
        for bits in (8, 4):
            q = copy.deepcopy(model)
            report = quantize_model(q, bits=bits, group_size=32)
            assert report.bytes_after == sum(m.nbytes for m in q.modules() if hasattr(m, "nbytes")), str(report)
            logp = [q(x)[0][0, n - 1:-1].log_softmax(-1) for x, n in zip(ids, n_prompt)]
            agree[bits] = [(lp.argmax(-1) == torch.tensor(t)).float().mean().item() for lp, t in zip(logp, hf_greedy)]
            kl[bits] = sum((f.exp() * (f - lp)).sum(-1).mean().item() for f, lp in zip(fp32, logp)) / len(ids)
            if bits == 8:   # and the quantized model decodes through the cache like its own uncached forward
                out = generate(q, tok, PROMPTS[1], 8, eos_token_id=None, fused=True)
                x = torch.tensor([out.prompts[0] + out.tokens[0]])
                assert out.tokens[0] == q(x)[0][0, n_prompt[1] - 1:-1].argmax(-1).tolist()
    assert min(agree[8]) >= 0.95, f"int8 picked fp32's token at only {agree[8]} of positions"
    assert 0.5 <= sum(agree[4]) / 3 < min(agree[8]), f"int4 agreement {agree[4]} vs int8 {agree[8]}"
    assert kl[8] * 10 < kl[4], f"KL to fp32: int8 {kl[8]:.4f}, int4 {kl[4]:.4f} nats per token"


def test_bad_calls_fail_with_one_clear_error(smollm2):
    _, tok, model = smollm2
    with pytest.raises(ValueError, match="need a tokenizer"):
        generate(model, None, "text")
    with pytest.raises(ValueError, match="stop strings"):
        generate(model, None, [[1, 2]], 4, stop=["x"])
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, tok, "x", 0)
    with pytest.raises(ValueError, match="one new token per row"):
        model.decode_step(torch.tensor([[1, 2]]), KVCache(model.cfg, 1, 8))
    gpt2 = GPT(GPTConfig(vocab_size=11, n_layer=1, n_head=2, n_embd=8)).eval()
    with pytest.raises(ValueError, match="fused=True needs a Llama-style GPT"):
        generate(gpt2, None, [[1, 2]], 4, fused=True)
    assert generate(gpt2, None, [[1, 2]], 4, eos_token_id=None).finish_reasons == ["length"]


# ----------------------------------------------------------------------------- how fast: bounds and stacks

def test_bounds_and_stacks_time_a_tiny_llama_and_reuse_a_finished_onnx_conversion(tmp_path):
    """The speed helpers the benchmark and notebooks 14/15 share: every decode-step matrix is found,
    the bounds and the HF / labkit stacks return positive timings, and a converted ONNX model is reused."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from labkit.decode import Bounds, hf_stack, labkit_stack, onnx_model_dir, weight_matrices
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                      eos_token_id=2)).eval()
    mats = weight_matrices(hf)
    assert len(mats) == 7 * 2 + 1 and mats[-1] is not None
    bounds = Bounds(mats)
    assert bounds.nbytes == sum(p.numel() * 4 for p in mats)
    measured = bounds.measure(repeats=1)
    assert all(v > 0 for v in measured.values()), measured
    ids = torch.randint(3, 97, (1, 5), generator=torch.Generator().manual_seed(0))
    for run in (hf_stack(hf, ids, 4), hf_stack(hf, ids, 4, cache_implementation="static"),
                labkit_stack(GPT.from_hf(hf).prepare_for_decode(), ids, 4, fused=True)):
        prefill_s, tokens_per_s = run()
        assert prefill_s > 0 and tokens_per_s > 0
    hf_dir = tmp_path / "cache" / "tiny-asset" / "hf"
    done = tmp_path / "cache" / "onnx-genai" / "tiny-asset" / "int4"
    done.mkdir(parents=True)
    (done / "genai_config.json").write_text("{}")
    assert onnx_model_dir(hf_dir, "int4") == done          # no second conversion
