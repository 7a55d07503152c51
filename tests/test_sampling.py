"""labkit.sampling = HF transformers' logits processors, filter by filter and composed.

Each filter's probabilities equal HF's (transformers 5: ``transformers.generation.logits_process``)
to 1e-6, and the set of kept tokens is identical, on random logits and on real SmolLM2
next-token logits, including the edges: ties at the k-th value, top_p = 1 and -> 0,
min_tokens_to_keep, -inf entries and rows, rows with different histories and padding.
"""

import pytest
import torch
from transformers import (LogitsProcessorList, MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                          TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

import labkit
from labkit.sampling import SamplingConfig, greedy, min_p, repetition_penalty, sample, temperature, top_k, top_p

TOL = 1e-6
PROMPTS = ["The capital of France is", "Once upon a time, in a small village by the sea, there lived",
           "def fibonacci(n):"]


def random_logits(B=4, V=1000, seed=0, scale=3.0):
    return torch.randn(B, V, generator=torch.Generator().manual_seed(seed)) * scale


def tied_logits(B=3, V=200, seed=0):
    """Few distinct values, so most k-th values and top-p boundaries fall on ties."""
    return torch.randint(0, 6, (B, V), generator=torch.Generator().manual_seed(seed)).float()


def partly_masked_logits(seed=0):
    """Half the vocabulary already at -inf (banned tokens, an earlier filter)."""
    logits = random_logits(seed=seed)
    logits[:, ::2] = float("-inf")
    return logits


@pytest.fixture(scope="module")
def smollm2_logits():
    """Real next-token logits of SmolLM2 for three prompts, (3, 49152), and their token ids."""
    model, tok = labkit.load_model()
    rows, ids = [], []
    with torch.no_grad():
        for prompt in PROMPTS:
            x = tok(prompt, return_tensors="pt").input_ids
            rows.append(model(x).logits[0, -1])
            ids.append(x[0])
    return torch.stack(rows), ids


def logit_cases(smollm2_logits):
    real, _ = smollm2_logits
    return {"random": random_logits(), "ties": tied_logits(), "partly -inf": partly_masked_logits(),
            "SmolLM2": real, "SmolLM2 at t=0.7": real / 0.7}


def assert_same_distribution(mine, hf, what):
    kept_mine, kept_hf = torch.isfinite(mine), torch.isfinite(hf)
    assert torch.equal(kept_mine, kept_hf), (
        f"{what}: kept {kept_mine.sum(-1).tolist()} tokens per row, HF kept {kept_hf.sum(-1).tolist()}")
    diff = (mine.softmax(-1) - hf.softmax(-1)).abs().max().item()
    assert diff <= TOL, f"{what}: probabilities differ from HF's by {diff:.2e} (> {TOL})"


def no_history(logits):
    return torch.zeros(logits.size(0), 1, dtype=torch.long)


@pytest.mark.parametrize("t", [0.05, 0.3, 0.7, 1.0, 1.5, 10.0])
def test_temperature_equals_hf(smollm2_logits, t):
    for name, logits in logit_cases(smollm2_logits).items():
        hf = TemperatureLogitsWarper(t)(no_history(logits), logits.clone())
        assert_same_distribution(temperature(logits, t), hf, f"temperature {t} on {name}")


@pytest.mark.parametrize("k", [1, 3, 5, 50, 200, 1000, 60000])
@pytest.mark.parametrize("keep", [1, 7])
def test_top_k_equals_hf(smollm2_logits, k, keep):
    for name, logits in logit_cases(smollm2_logits).items():
        hf = TopKLogitsWarper(k, min_tokens_to_keep=keep)(no_history(logits), logits.clone())
        assert_same_distribution(top_k(logits, k, keep), hf, f"top_k {k} (keep {keep}) on {name}")


@pytest.mark.parametrize("p", [0.0, 1e-9, 0.1, 0.5, 0.8, 0.9, 0.95, 0.999, 1.0])
@pytest.mark.parametrize("keep", [1, 7])
def test_top_p_equals_hf(smollm2_logits, p, keep):
    for name, logits in logit_cases(smollm2_logits).items():
        hf = TopPLogitsWarper(p, min_tokens_to_keep=keep)(no_history(logits), logits.clone())
        assert_same_distribution(top_p(logits, p, keep), hf, f"top_p {p} (keep {keep}) on {name}")


@pytest.mark.parametrize("p", [0.0, 0.01, 0.05, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("keep", [1, 7])
def test_min_p_equals_hf(smollm2_logits, p, keep):
    for name, logits in logit_cases(smollm2_logits).items():
        hf = MinPLogitsWarper(p, min_tokens_to_keep=keep)(no_history(logits), logits.clone())
        assert_same_distribution(min_p(logits, p, keep), hf, f"min_p {p} (keep {keep}) on {name}")


@pytest.mark.parametrize("penalty", [0.7, 1.0, 1.3, 2.0])
def test_repetition_penalty_equals_hf_with_different_histories_and_left_padding(smollm2_logits, penalty):
    real, prompt_ids = smollm2_logits
    # Left-pad the three prompts to one (B, T) batch, as a batched decoder holds them.
    T = max(len(x) for x in prompt_ids)
    history = torch.zeros(len(prompt_ids), T, dtype=torch.long)
    mask = torch.zeros(len(prompt_ids), T, dtype=torch.bool)
    for i, x in enumerate(prompt_ids):
        history[i, T - len(x):], mask[i, T - len(x):] = x, True
    history[:, 0] = torch.where(mask[:, 0], history[:, 0], 7)        # padding holds a real id: must be ignored
    pads = (~mask).sum(-1)
    hf = RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=pads)(history, real.clone())
    mine = repetition_penalty(real, history, penalty, history_mask=mask)
    assert_same_distribution(mine, hf, f"repetition penalty {penalty}, left-padded SmolLM2 prompts")
    if penalty != 1.0:
        assert mine[mask.logical_not().any(-1), 7].eq(real[mask.logical_not().any(-1), 7]).all(), \
            "token 7 sits only in padding: its logit must not move"
    # Random logits: repeated ids, different histories per row, no padding.
    logits = random_logits()
    history = torch.randint(0, 50, (4, 30), generator=torch.Generator().manual_seed(1))
    hf = RepetitionPenaltyLogitsProcessor(penalty)(history, logits.clone())
    assert_same_distribution(repetition_penalty(logits, history, penalty), hf,
                             f"repetition penalty {penalty}, random histories")


def test_composed_config_equals_hf_processor_list(smollm2_logits):
    real, prompt_ids = smollm2_logits
    history = torch.stack([x[-4:] for x in prompt_ids])                # (3, 4): a different history per row
    for cfg in [SamplingConfig(temperature=0.7, top_k=50, top_p=0.9, min_p=0.05, repetition_penalty=1.3),
                SamplingConfig(temperature=1.3, top_k=5, min_tokens_to_keep=2),
                SamplingConfig(top_p=0.5, min_p=0.2),
                SamplingConfig()]:
        hf = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(cfg.repetition_penalty),
                                  TemperatureLogitsWarper(cfg.temperature),
                                  TopKLogitsWarper(cfg.top_k or real.size(-1), min_tokens_to_keep=cfg.min_tokens_to_keep),
                                  TopPLogitsWarper(cfg.top_p, min_tokens_to_keep=cfg.min_tokens_to_keep),
                                  MinPLogitsWarper(cfg.min_p, min_tokens_to_keep=cfg.min_tokens_to_keep)])
        assert_same_distribution(cfg.process(real, history), hf(history, real.clone()), str(cfg))


def test_sampling_reproduces_hf_generate_token_for_token():
    """Same seed, same settings: HF's generate and the hand processors + one multinomial draw
    per step pick the same tokens (HF draws from the global generator, so do we here)."""
    model, tok = labkit.load_model()
    x = tok(PROMPTS[1], return_tensors="pt").input_ids
    for cfg in [SamplingConfig(temperature=0.8, top_k=40, top_p=0.9, repetition_penalty=1.2),
                SamplingConfig(temperature=1.5, min_p=0.1)]:
        torch.manual_seed(123)
        out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=True, max_new_tokens=6,
                             temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                             min_p=cfg.min_p or None, repetition_penalty=cfg.repetition_penalty,
                             pad_token_id=tok.eos_token_id)
        torch.manual_seed(123)
        ids = x
        with torch.no_grad():
            for _ in range(6):
                nxt = cfg.next_token(model(ids).logits[:, -1], history=ids)
                ids = torch.cat([ids, nxt[:, None]], dim=1)
        assert ids.tolist() == out.tolist(), f"{cfg}: ours {ids[0, -6:].tolist()} vs HF {out[0, -6:].tolist()}"


def test_greedy_config_is_argmax_after_the_penalty(smollm2_logits):
    real, prompt_ids = smollm2_logits
    assert torch.equal(SamplingConfig(temperature=0).next_token(real), real.argmax(-1))
    history = real.argmax(-1, keepdim=True)                            # penalise each row's own argmax
    hf = RepetitionPenaltyLogitsProcessor(5.0)(history, real.clone())
    chosen = SamplingConfig(temperature=0, repetition_penalty=5.0).next_token(real, history=history)
    assert torch.equal(chosen, hf.argmax(-1))
    assert (chosen != history[:, 0]).all(), "a 5x penalty on the argmax should move greedy elsewhere here"


def test_edges_ties_top_p_extremes_and_min_tokens_to_keep():
    logits = tied_logits()
    assert (torch.isfinite(top_k(logits, 3)).sum(-1) > 3).all(), "ties at the 3rd value keep them all"
    real = random_logits()
    assert torch.equal(torch.isfinite(top_p(real, 1e-9)).sum(-1), torch.ones(4, dtype=torch.long))
    assert torch.equal(top_p(real, 0.0).argmax(-1), real.argmax(-1)), "top_p -> 0 keeps the argmax"
    assert torch.isfinite(top_p(real, 1.0)).all(), "top_p = 1 keeps every token of nonzero probability"
    assert (torch.isfinite(top_p(real, 0.0, min_tokens_to_keep=5)).sum(-1) == 5).all()
    assert (torch.isfinite(min_p(real, 1.0, min_tokens_to_keep=5)).sum(-1) == 5).all()
    assert (torch.isfinite(top_k(real, 2, min_tokens_to_keep=5)).sum(-1) == 5).all()


def test_a_row_with_nothing_left_gets_one_clear_error():
    logits = random_logits(B=3)
    logits[1] = float("-inf")
    for f in (lambda z: temperature(z, 0.5), lambda z: top_k(z, 5), lambda z: top_p(z, 0.9),
              lambda z: min_p(z, 0.1)):
        out = f(logits)
        assert torch.isinf(out[1]).all() and torch.isfinite(out[0]).any(), "a dead row stays dead, others live"
    with pytest.raises(ValueError, match=r"row\(s\) \[1\] have every logit at -inf"):
        sample(logits)
    with pytest.raises(ValueError, match="every logit at -inf"):
        greedy(logits)
    logits[1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        sample(logits)


def test_bad_settings_name_the_fix():
    x = random_logits()
    with pytest.raises(ValueError, match="greedy"):
        temperature(x, 0.0)
    with pytest.raises(ValueError, match="top_k must be a positive int"):
        top_k(x, 0)
    with pytest.raises(ValueError, match=r"top_p must be in \[0, 1\]"):
        SamplingConfig(top_p=1.5)
    with pytest.raises(ValueError, match="history must be"):
        repetition_penalty(x, torch.tensor([1, 2]), 1.2)
    with pytest.raises(ValueError, match="history_mask"):
        repetition_penalty(x, torch.full((4, 3), -1), 1.2)


def test_seeded_sampling_is_reproducible_and_is_hfs_draw(smollm2_logits):
    real, _ = smollm2_logits
    cfg = SamplingConfig(temperature=1.2, top_p=0.95)
    draws = lambda seed: torch.stack([cfg.next_token(real, generator=g)
                                      for g in [torch.Generator().manual_seed(seed)] for _ in range(20)])
    assert torch.equal(draws(0), draws(0)), "same seed, same tokens"
    assert not torch.equal(draws(0), draws(1)), "another seed draws other tokens"
    hf = LogitsProcessorList([TemperatureLogitsWarper(1.2), TopPLogitsWarper(0.95)])(no_history(real), real.clone())
    g = torch.Generator().manual_seed(0)
    hf_draws = torch.stack([torch.multinomial(hf.softmax(-1), 1, generator=g).squeeze(-1) for _ in range(20)])
    assert torch.equal(draws(0), hf_draws), "the same generator state gives HF's tokens"


def test_sample_frequencies_follow_the_probabilities():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    g = torch.Generator().manual_seed(0)
    n = 20000
    counts = torch.bincount(torch.cat([sample(probs.log().expand(n, 4), g)]), minlength=4).float()
    # binomial standard error at n = 20000 is <= 0.0036; 5 of them is a generous margin
    assert (counts / n - probs[0]).abs().max() < 0.018, f"frequencies {counts / n} vs {probs[0]}"
