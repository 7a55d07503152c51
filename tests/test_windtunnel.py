"""Track D's wind tunnel: the exact posterior every model is graded against, the data the lab's
training loop reads, the calibration metrics, and the lab's GPT learning the task and coming back
from its run directory."""
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from labkit import windtunnel as wt
from labkit.gpt import GPT, GPTConfig
from labkit.runs import CheckpointError, Run
from labkit.train import TrainConfig, train
from labkit.windtunnel import bayes_posterior, entropy_bits, kl_bits, make_batch, to_tokens

ROOT = Path(__file__).resolve().parents[1]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- the exact posterior

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


# ----------------------------------------------------------------------------- the data

def test_data_scores_only_the_value_after_each_key():
    data = wt.WindTunnel(n_keys=6)
    x, y = data.batch("train", 32, data.block_size, gen())
    assert x.shape == y.shape == (32, 10) and data.vocab_size == 12
    assert (y[:, 1::2] == -100).all(), "positions holding a value (predicting the next key) must not be scored"
    assert torch.equal(y[:, 0::2], x[:, 1::2]), "at a key the target is the next token: its value"
    assert (y[:, 0::2] >= 6).all(), "targets are value tokens (ids V..2V-1)"
    x2, _ = data.batch("train", 32, data.block_size, gen())
    x3, _ = data.batch("train", 32, data.block_size, gen(1))
    assert torch.equal(x, x2) and not torch.equal(x, x3), "fresh sequences per generator state, seeded"


def test_data_mixes_repeats_into_the_last_rows_and_checks_block_size():
    data = wt.WindTunnel(n_keys=8, p_repeat=0.5, mix_repeat=0.5)
    keys, _ = data.sample(200, gen())
    n_distinct = torch.tensor([len(set(k)) for k in keys.tolist()])
    assert (n_distinct[:100] == 7).all(), "the first half must never repeat a key"
    assert (n_distinct[100:] < 7).float().mean() > 0.9, "the second half repeats keys"
    with pytest.raises(ValueError, match="block_size=data.block_size"):
        data.batch("train", 4, 16, gen())
    with pytest.raises(ValueError, match="p_repeat"):
        wt.WindTunnel(n_keys=4, n_pairs=6)


# ----------------------------------------------------------------------------- grading

class Oracle(nn.Module):
    """Reads the tokens and outputs the exact posterior's log-probabilities: a perfect model."""

    def __init__(self, V):
        super().__init__()
        self.cfg = GPTConfig(vocab_size=2 * V, n_layer=1, n_head=1, n_embd=8)
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, idx, targets=None):
        V = self.cfg.vocab_size // 2
        keys, vals = idx[:, 0::2], idx[:, 1::2] - V
        logits = torch.zeros(*idx.shape, 2 * V)
        logits[:, 0::2, V:] = bayes_posterior(keys, vals, V).clamp_min(1e-30).log()
        return logits, None


def test_calibration_is_zero_for_bayes_and_the_floor_for_a_uniform_model():
    V = 8
    keys, vals = make_batch(256, V, generator=gen())
    perfect = wt.calibration(Oracle(V), keys, vals)
    assert perfect["calib_err"] < 1e-5 and perfect["kl"] < 1e-5, perfect
    blind = GPT(GPTConfig(vocab_size=2 * V, block_size=2 * (V - 1), n_layer=1, n_head=1, n_embd=8))
    with torch.no_grad():
        blind.lm_head.weight.zero_()                                  # every logit 0: uniform over values
    m = wt.calibration(blind, keys, vals)
    floor = sum(math.log2(V) - math.log2(V - t) for t in range(V - 1)) / (V - 1)
    assert abs(m["calib_err"] - floor) < 1e-5 and abs(m["kl"] - floor) < 1e-5, (m, floor)
    assert m["err_t"].shape == m["kl_t"].shape == (V - 1,) and m["err_t"][0] < 1e-5, "t = 0: uniform is Bayes"


@pytest.mark.parametrize("kind", ["mlp", "lstm"])
def test_baselines_speak_the_gpt_interface(kind):
    data = wt.WindTunnel(n_keys=6)
    cfg = wt.BaselineConfig(vocab_size=data.vocab_size, block_size=data.block_size, n_embd=8, d_hidden=16)
    model = {"mlp": wt.MLPBaseline, "lstm": wt.LSTMBaseline}[kind](cfg)
    x, y = data.batch("train", 3, data.block_size, gen())
    logits, loss = model(x, y)
    assert logits.shape == (3, 10, 12) and loss.ndim == 0
    keys, vals = data.sample(3, gen())
    assert wt.value_logits(model, keys, vals).shape == (3, 5, 6), "(B, L, V): value logits at key positions"


def test_a_tiny_gpt_learns_the_task_and_comes_back_from_its_run(tmp_path):
    torch.manual_seed(0)
    data = wt.WindTunnel(n_keys=6)
    model = GPT(GPTConfig(vocab_size=data.vocab_size, block_size=data.block_size, n_layer=1, n_head=1,
                          n_embd=32, pos="learned", bias=True, tie_embeddings=False))
    calib = wt.Calibration(data, n_sequences=512)
    run = Run.create(tmp_path, "tunnel")
    cfg = TrainConfig(steps=200, batch_size=32, block_size=data.block_size, lr=1e-2, min_lr=1e-3,
                      warmup_steps=10, eval_every=100, eval_batches=2)
    history = train(model, data, cfg, callbacks=[calib], run=run)
    steps, errs = history.series("calib_err")
    assert steps == [0, 99, 199] and len(history.series("kl")[1]) == 3, "the callback logs at every evaluation"
    floor = sum(math.log2(6) - math.log2(6 - t) for t in range(5)) / 5               # 0.69 bits for V = 6
    assert errs[0] > 0.8 * floor, f"an untrained model sits near the context-blind floor {floor:.2f}, got {errs[0]:.3f}"
    assert errs[-1] < 0.6 * floor, f"200 steps must take the error well below the floor {floor:.2f}: {errs}"
    logged = [r for r in run.rows() if "calib_err" in r]
    assert [r["calib_err"] for r in logged] == errs, "metrics.jsonl holds the calibration metrics"

    again = GPT.from_run(run.path)                                   # config.json + safetensors, sha256-checked
    assert wt.calibration(again, calib.keys, calib.vals)["calib_err"] == pytest.approx(errs[-1], abs=1e-6)
    weights = next(run.checkpoint_dir.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-100])                 # a truncated copy
    with pytest.raises(CheckpointError, match=r"missing or damaged.*earlier step_"):
        GPT.from_run(run.path)


def test_baselines_train_through_the_lab_loop():
    torch.manual_seed(0)
    data = wt.WindTunnel(n_keys=6)
    model = wt.LSTMBaseline(wt.BaselineConfig(vocab_size=data.vocab_size, block_size=data.block_size,
                                              n_embd=16, d_hidden=32, n_hidden=1))
    history = train(model, data, TrainConfig(steps=30, batch_size=16, block_size=data.block_size, lr=1e-2,
                                             eval_every=30, eval_batches=1))
    assert history["loss"][-1] < history["loss"][0], f"the LSTM's loss must fall: {history['loss'][::10]}"


def test_no_checkpoint_is_unpickled_anywhere():
    flag = "weights_only" + "=False"                  # unpickling runs code from the file
    hits = [str(p.relative_to(ROOT)) for folder in ("labkit", "tests", "notebooks", "benchmarks")
            for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".ipynb") and flag in p.read_text()]
    assert not hits, f"{flag} in {hits}: save with labkit.runs (safetensors + sha256) instead"
