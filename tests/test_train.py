"""The basic training loop and the Shakespeare data pipeline."""
import pytest
import torch

from labkit.data import BPETokenizer, CharTokenizer, shakespeare_data
from labkit.gpt import GPT, GPTConfig
from labkit.train import TrainConfig, lr_at, train


@pytest.fixture(scope="module")
def chars():
    return shakespeare_data("char", max_chars=200_000)


def test_batches_are_windows_with_targets_shifted_by_one(chars):
    x, y = chars.batch("train", 4, 32, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 32)
    assert torch.equal(x[:, 1:], y[:, :-1])
    with pytest.raises(ValueError, match="split must be 'train' or 'val'"):
        chars.batch("test", 4, 32)


def test_tokenizers_round_trip_and_fail_clearly():
    text = "To be, or not to be: that is the question.\n"
    assert CharTokenizer(text).decode(CharTokenizer(text).encode(text)) == text
    with pytest.raises(ValueError, match="not in this tokenizer's vocabulary"):
        CharTokenizer("abc").encode("abd")
    bpe = BPETokenizer(text * 40, vocab_size=300)
    assert bpe.decode(bpe.encode("Whether 'tis nobler")) == "Whether 'tis nobler"
    assert len(bpe.encode(text)) < len(text.encode()), "BPE should compress its training text"


def test_schedule_warms_up_then_decays():
    cfg = TrainConfig(steps=100, lr=1e-3, min_lr=1e-4, warmup_steps=10)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] < lrs[9] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])), "cosine phase must not increase"


def test_training_lowers_val_loss_and_is_deterministic(chars):
    cfg = GPTConfig(vocab_size=chars.tokenizer.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=32)
    tcfg = TrainConfig(steps=60, batch_size=8, block_size=32, lr=3e-3, warmup_steps=10, eval_every=30,
                       eval_batches=4)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = GPT(cfg)
        runs.append(train(model, chars, tcfg, progress=False))
    a, b = runs
    assert a["loss"] == b["loss"] and a["val_loss"] == b["val_loss"], "same seed, same run"
    assert a["val_step"] == [0, 29, 59], "val loss after the first step, every eval_every, and at the end"
    uniform = torch.log(torch.tensor(float(cfg.vocab_size))).item()
    assert a["val_loss"][-1] < 0.8 * uniform, f"expected learning: val {a['val_loss'][-1]:.2f} vs ln V {uniform:.2f}"


def test_moe_aux_loss_is_added_and_experts_are_used(chars):
    cfg = GPTConfig(vocab_size=chars.tokenizer.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=32,
                    ffn="moe", n_experts=4, top_k=2)
    torch.manual_seed(0)
    model = GPT(cfg)
    train(model, chars, TrainConfig(steps=5, batch_size=4, block_size=32, eval_every=5, eval_batches=1),
          progress=False)
    counts = model.blocks[0].mlp.counts
    assert counts.sum() == 4 * 32 * 2, "every token is routed to top_k=2 experts"
    assert 0 < model.aux_loss().item() <= 4, "the balancing loss lies in (0, n_experts]"
