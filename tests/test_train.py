"""The training loop (callbacks, time budget, synthetic data, Hugging Face models, LoRA) and the
Shakespeare data pipeline."""
import csv
import math
import time
from dataclasses import replace

import pytest
import torch

from labkit.data import BPETokenizer, CharTokenizer, shakespeare_data
from labkit.gpt import GPT, GPTConfig
from labkit.plotting import LiveCurves
from labkit.runs import Run, load_checkpoint
from labkit.train import Callback, TrainConfig, evaluate, lm_loss, lr_at, make_optimizer, train


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


# ----------------------------------------------------------------------------- callbacks

def tiny_gpt(vocab_size, n_layer=1, block_size=32):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=2, n_embd=32))


def test_callbacks_see_every_row_add_eval_metrics_and_are_closed(chars, tmp_path):
    cfg = TrainConfig(steps=10, batch_size=4, block_size=32, warmup_steps=2, eval_every=4, eval_batches=2)

    class TrainSplitLoss(Callback):           # a metric of its own at every evaluation (track D: KL)
        def __init__(self):
            self.steps, self.closed = [], 0

        def on_eval(self, step, model):
            return {"train_split_loss": evaluate(model, chars, cfg, split="train")}

        def on_step(self, step, row):
            self.steps.append(step)

        def close(self):
            self.closed += 1
    seen = []
    cb = TrainSplitLoss()
    live = LiveCurves(["loss"], live=False)   # the lab's live monitor is one, too
    run = Run.create(tmp_path, "callbacks")
    history = train(tiny_gpt(chars.tokenizer.vocab_size), chars, cfg, run=run, progress=False,
                    callbacks=[cb, lambda step, row: seen.append(dict(row)), live])
    assert cb.steps == list(range(10)) and [r["step"] for r in seen] == list(range(10)) and cb.closed == 1
    assert live.history["loss"][0] == list(range(10)) and live.history["loss"][1] == history["loss"]
    steps, values = history.series("train_split_loss")
    assert steps == history["val_step"] == [0, 3, 7, 9], "measured exactly where val_loss is"
    assert [r["step"] for r in run.rows() if "train_split_loss" in r] == steps
    with open(run.path / "metrics.csv", newline="") as f:
        header = next(csv.reader(f))
    assert "train_split_loss" in header and "tokens_per_sec" in header and "tokens_sec" not in header
    plain = train(tiny_gpt(chars.tokenizer.vocab_size), chars, cfg, progress=False)
    assert plain["loss"] == history["loss"], "callbacks never change the trajectory"


def test_callbacks_are_closed_when_training_fails(chars):
    class Fails(Callback):
        closed = False

        def on_step(self, step, row):
            raise RuntimeError("broken callback")

        def close(self):
            self.closed = True
    cb = Fails()
    with pytest.raises(RuntimeError, match="broken callback"):
        train(tiny_gpt(chars.tokenizer.vocab_size), chars, TrainConfig(steps=3, batch_size=2, block_size=32,
              eval_batches=1), callbacks=[cb], progress=False)
    assert cb.closed


def test_max_seconds_stops_evaluates_checkpoints_and_resumes(chars, tmp_path):
    cfg = TrainConfig(steps=100_000, batch_size=2, block_size=32, eval_every=10**9, eval_batches=1,
                      max_seconds=1.0)
    run = Run.create(tmp_path, "budget")
    t0 = time.monotonic()
    history = train(tiny_gpt(chars.tokenizer.vocab_size), chars, cfg, run=run, progress=False)
    assert time.monotonic() - t0 >= 1.0
    done = history.steps_done
    assert history.stopped and 0 < done < cfg.steps and len(history["loss"]) == done
    assert history["val_step"] == [0, done - 1], "the last step of the budget is evaluated"
    assert load_checkpoint(run.path)[1]["step"] == done
    again = train(tiny_gpt(chars.tokenizer.vocab_size), chars, replace(cfg, max_seconds=0.5), run=run,
                  resume=True, progress=False)       # another budget is not another config
    assert again.steps_done > done and again["step"] == list(range(again.steps_done))


class CopyTask:
    """Fresh random sequences every batch, scored only on their second half (y = -100 elsewhere):
    the second half repeats the first, so a model that learns to copy beats ln(vocab)."""
    vocab = 16

    def batch(self, split, batch_size, block_size, generator=None):
        half = torch.randint(self.vocab, (batch_size, block_size // 2), generator=generator)
        seq = torch.cat([half, half, half[:, :1]], dim=1)                 # (B, T + 1)
        x, y = seq[:, :-1], seq[:, 1:].clone()
        y[:, : block_size // 2 - 1] = -100                                # the first half is unpredictable
        return x, y


def test_synthetic_data_scores_only_positions_with_targets():
    data, cfg = CopyTask(), TrainConfig(steps=150, batch_size=16, block_size=16, lr=1e-2, warmup_steps=10,
                                        eval_every=50, eval_batches=2)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=16, block_size=16, n_layer=2, n_head=2, n_embd=32))
    x, y = data.batch("train", 4, 16, torch.Generator().manual_seed(1))
    logits, _ = model(x)
    scored = y != -100
    manual = torch.nn.functional.cross_entropy(logits[scored], y[scored])
    assert lm_loss(model, x, y).item() == pytest.approx(manual.item(), rel=1e-6)
    history = train(model, data, cfg, progress=False)
    uniform = math.log(16)
    assert history["val_loss"][0] > 0.9 * uniform and history["val_loss"][-1] < 0.5 * uniform, \
        f"copying should be learned: val {history['val_loss']} vs ln 16 = {uniform:.2f}"


# ----------------------------------------------------------------------------- Hugging Face models

def tiny_llama(vocab_size):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                        max_position_embeddings=64, tie_word_embeddings=True))


def test_a_hugging_face_causal_lm_trains(chars):
    model = tiny_llama(chars.tokenizer.vocab_size)
    x, y = chars.batch("train", 2, 32, torch.Generator().manual_seed(0))
    # HF's own labels= shifts inside, so it scores the first 31 of our 32 positions: the same loss there
    first_31 = torch.cat([y[:, :-1], torch.full((2, 1), -100)], dim=1)
    assert lm_loss(model, x, first_31).item() == pytest.approx(model(input_ids=x, labels=x).loss.item(), rel=1e-5)
    history = train(model, chars, TrainConfig(steps=30, batch_size=8, block_size=32, lr=3e-3, warmup_steps=5,
                                              eval_every=15, eval_batches=2), progress=False)
    assert history["val_loss"][-1] < history["val_loss"][0] - 0.5, f"expected learning: {history['val_loss']}"
    assert len(history.rows) == 30 and all(r["tokens_per_sec"] > 0 for r in history.rows)


def test_lora_with_8bit_adamw_trains_only_the_adapters_and_resumes_bit_exact(chars, tmp_path):
    import warnings
    from peft import LoraConfig, get_peft_model

    def lora_model():
        with warnings.catch_warnings():     # peft calls a transformers method that warns it is renamed
            warnings.simplefilter("ignore", FutureWarning)
            torch.manual_seed(0)
            return get_peft_model(tiny_llama(chars.tokenizer.vocab_size),
                                  LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    cfg = TrainConfig(steps=8, batch_size=4, block_size=32, lr=1e-2, warmup_steps=2, eval_every=4,
                      eval_batches=1, optimizer="adamw8bit", checkpoint_every=4)
    straight = lora_model()
    frozen_before = {n: p.clone() for n, p in straight.named_parameters() if not p.requires_grad}
    reference = train(straight, chars, cfg, progress=False)
    assert all(torch.equal(p, frozen_before[n]) for n, p in straight.named_parameters() if not p.requires_grad)
    assert type(make_optimizer(straight, cfg)).__name__ == "AdamW8bit"

    run = Run.create(tmp_path, "lora")

    def interrupt_at_5(step, row):
        if step == 4:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train(lora_model(), chars, cfg, run=run, callbacks=[interrupt_at_5], progress=False)
    tensors, meta = load_checkpoint(run.path)
    saved = [k for k in tensors if k.startswith("model.")]
    assert meta["step"] == 5 and saved and all("lora_" in k for k in saved), "only the adapters are saved"
    resumed = lora_model()
    history = train(resumed, chars, cfg, run=run, resume=True, progress=False)
    assert history["loss"] == reference["loss"], "8-bit optimizer state and adapters resume bit for bit"
    assert all(torch.equal(a, b) for a, b in zip(resumed.state_dict().values(), straight.state_dict().values()))
