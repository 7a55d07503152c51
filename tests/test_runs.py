"""The instrumented loop: logs, run-directory protection, atomic checkpoints, bit-exact resume."""
import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import labkit.runs as runs
from labkit.data import shakespeare_data
from labkit.gpt import GPT, GPTConfig
from labkit.runs import CheckpointError, Run, load_checkpoint
from labkit.diagnostics import activation_stats
from labkit.train import TrainConfig, train

REQUIRED_COLUMNS = ["step", "tokens_per_sec", "loss", "val_loss", "lr", "grad_norm", "update_ratio", "dead_perc"]


@pytest.fixture(scope="module")
def chars():
    return shakespeare_data("char", max_chars=100_000)


def small(chars, **kw):
    cfg = GPTConfig(vocab_size=chars.tokenizer.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=32, **kw)
    torch.manual_seed(0)
    return GPT(cfg)


TCFG = TrainConfig(steps=20, batch_size=4, block_size=32, warmup_steps=4, eval_every=5, eval_batches=2,
                   diag_every=3, checkpoint_every=6)


def weights_equal(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_logs_have_every_column_and_a_val_loss_on_every_row(chars, tmp_path):
    run = Run.create(tmp_path, "log")
    history = train(small(chars), chars, TCFG, run=run, progress=False)
    with open(run.path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == TCFG.steps and set(REQUIRED_COLUMNS) <= set(rows[0])
    assert all(r["val_loss"] != "" for r in rows), "val_loss is carried forward, never empty"
    assert [int(r["step"]) for r in rows if r["val_step"] == r["step"]] == [0, 4, 9, 14, 19]
    assert all(r["update_ratio"] != "" for r in rows), "the update ratio is measured every step"
    assert [int(r["step"]) for r in rows if r["dead_perc"] != ""] == list(range(0, 20, 3))
    jsonl = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in jsonl] == list(range(20)) and "ud_attn" in jsonl[0] and "attn_entropy_1" in jsonl[0]
    assert history["loss"] == [r["loss"] for r in jsonl]
    config = run.read_config()
    assert config["train_config"]["steps"] == 20 and config["model_config"]["n_layer"] == 2


def test_diagnostics_do_not_change_the_trajectory(chars):
    plain = train(small(chars), chars, TrainConfig(**{**TCFG.__dict__, "diag_every": 0}), progress=False)
    diag = train(small(chars), chars, TCFG, progress=False)
    assert plain["loss"] == diag["loss"], "diagnostics use their own passes and RNG streams"


def test_dead_units_and_attention_entropy_are_measured_exactly(chars):
    model = small(chars, act="relu")
    with torch.no_grad():
        model.blocks[0].mlp.fc.weight[:32] = 0          # 32 of 128 units can never fire
        for block in model.blocks:
            block.attn.qkv.weight.zero_()               # q = k = 0: uniform causal attention
    x = torch.randint(0, chars.tokenizer.vocab_size, (4, 16))
    stats = activation_stats(model, x)
    assert stats["dead_perc_0"] >= 25.0 and stats["dead_perc_1"] < stats["dead_perc_0"]
    uniform = torch.log(torch.arange(1, 17.0)).mean().item()       # mean over t of ln(t + 1)
    assert stats["attn_entropy_0"] == pytest.approx(uniform, abs=1e-5)


def test_run_directories_are_never_reused(chars, tmp_path):
    first = Run.create(tmp_path, "exp")
    (first.path / "notes.txt").write_text("mine")
    second = Run.create(tmp_path, "exp")
    assert second.path.name == "exp-2" and (first.path / "notes.txt").read_text() == "mine"
    train(small(chars), chars, TrainConfig(steps=3, batch_size=4, block_size=32, eval_batches=1),
          run=first, progress=False)
    before = {p.name: p.read_bytes() for p in first.path.rglob("*") if p.is_file()}
    with pytest.raises(CheckpointError, match="resume=True"):
        train(small(chars), chars, TrainConfig(steps=3, batch_size=4, block_size=32, eval_batches=1),
              run=first, progress=False)
    after = {p.name: p.read_bytes() for p in first.path.rglob("*") if p.is_file()}
    assert before == after, "a refused run must not touch the existing one"


def test_resume_is_bit_exact(chars, tmp_path):
    """20 steps == 10 steps + interrupt + resume + 10 steps, weights and logs bit for bit."""
    straight = small(chars)
    reference = train(straight, chars, TCFG, run=Run.create(tmp_path, "straight"), progress=False)

    run = Run.create(tmp_path, "split")

    def interrupt_at_10(step, row):
        if step == 9:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train(small(chars), chars, TCFG, run=run, callbacks=[interrupt_at_10], progress=False)
    assert load_checkpoint(run.path)[1]["step"] == 10

    torch.manual_seed(123)                      # a different init and global RNG: the checkpoint wins
    resumed = GPT(small(chars).cfg)
    history = train(resumed, chars, TCFG, run=run, resume=True, progress=False)
    assert weights_equal(straight, resumed)
    assert history["loss"] == reference["loss"] and history["val_loss"] == reference["val_loss"]
    assert [r["step"] for r in run.rows()] == list(range(20))


def test_resume_after_a_crash_replays_logged_steps_past_the_checkpoint(chars, tmp_path):
    straight = small(chars)
    train(straight, chars, TCFG, progress=False)
    run = Run.create(tmp_path, "crash")

    def crash_at_8(step, row):                  # not an interrupt: no checkpoint at 8, the last is 6
        if step == 8:
            raise RuntimeError("power cut")
    with pytest.raises(RuntimeError):
        train(small(chars), chars, TCFG, run=run, callbacks=[crash_at_8], progress=False)
    assert load_checkpoint(run.path)[1]["step"] == 6
    resumed = small(chars)
    train(resumed, chars, TCFG, run=run, resume=True, progress=False)
    assert weights_equal(straight, resumed)
    assert [r["step"] for r in run.rows()] == list(range(20)), "steps 6-8 logged once, not twice"


def test_sigint_finishes_the_step_then_checkpoints(chars, tmp_path):
    run = Run.create(tmp_path, "sigint")
    before = signal.getsignal(signal.SIGINT)    # Python's default, or SIG_IGN under nohup / in a background job

    def press_interrupt(step, row):
        if step == 4:
            os.kill(os.getpid(), signal.SIGINT)   # what the kernel's interrupt button sends
    with pytest.raises(KeyboardInterrupt):
        train(small(chars), chars, TCFG, run=run, callbacks=[press_interrupt], progress=False)
    assert load_checkpoint(run.path)[1]["step"] == 5
    assert signal.getsignal(signal.SIGINT) is before, "the SIGINT handler is restored to what it was"


def test_stop_request_checkpoints_and_resumes(chars, tmp_path):
    class StopAt7:
        stop_requested = False

        def on_step(self, step, row):
            self.stop_requested = step == 6
    straight = small(chars)
    train(straight, chars, TCFG, progress=False)
    run = Run.create(tmp_path, "stop")
    history = train(small(chars), chars, TCFG, run=run, callbacks=[StopAt7()], progress=False)
    assert history.stopped and len(history["loss"]) == 7 and history.steps_done == 7
    resumed = small(chars)
    train(resumed, chars, TCFG, run=run, resume=True, progress=False)
    assert weights_equal(straight, resumed)


def test_resume_refuses_a_different_config(chars, tmp_path):
    run = Run.create(tmp_path, "cfg")
    train(small(chars), chars, TrainConfig(steps=3, batch_size=4, block_size=32, eval_batches=1),
          run=run, progress=False)
    with pytest.raises(CheckpointError, match="lr"):
        train(small(chars), chars, TrainConfig(steps=3, batch_size=4, block_size=32, eval_batches=1, lr=1.0),
              run=run, resume=True, progress=False)
    with pytest.raises(CheckpointError, match="n_embd"):
        model = GPT(GPTConfig(vocab_size=chars.tokenizer.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=64))
        train(model, chars, TrainConfig(steps=3, batch_size=4, block_size=32, eval_batches=1),
              run=run, resume=True, progress=False)


def test_a_failed_save_leaves_the_previous_checkpoint_latest(chars, tmp_path, monkeypatch):
    run = Run.create(tmp_path, "atomic")
    cfg = TrainConfig(steps=4, batch_size=4, block_size=32, eval_batches=1, checkpoint_every=2)
    model = small(chars)
    train(model, chars, cfg, run=run, progress=False)          # checkpoints at 2 and 4
    real_save = runs.save_file

    def dies_halfway(tensors, path):
        real_save(tensors, path)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)   # the disk filled up / the process died here
        raise OSError("No space left on device")
    monkeypatch.setattr(runs, "save_file", dies_halfway)
    with pytest.raises(OSError):
        run.save_checkpoint(5, model, torch.optim.AdamW(model.parameters()), torch.Generator(), {})
    assert load_checkpoint(run.path)[1]["step"] == 4
    names = sorted(p.name for p in run.checkpoint_dir.iterdir())
    assert names == ["latest.json", "step_000002.json", "step_000002.safetensors",
                     "step_000004.json", "step_000004.safetensors"], f"no partial file left: {names}"


def test_damaged_weights_are_refused_with_the_fix(chars, tmp_path):
    run = Run.create(tmp_path, "damaged")
    train(small(chars), chars, TrainConfig(steps=2, batch_size=4, block_size=32, eval_batches=1),
          run=run, progress=False)
    weights = run.checkpoint_dir / "step_000002.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="damaged.*earlier step_"):
        load_checkpoint(run.path)


def test_killing_a_run_mid_checkpoint_never_corrupts_latest(tmp_path):
    """SIGKILL a process that checkpoints continuously, at several moments: latest always loads."""
    script = textwrap.dedent(f"""
        import torch
        from labkit.runs import Run
        model = torch.nn.Linear(512, 512)
        opt = torch.optim.AdamW(model.parameters())
        run = Run.create({str(tmp_path)!r}, "kill")
        print("ready", flush=True)
        for step in range(1, 100_000):
            model.weight.data.fill_(step)
            run.save_checkpoint(step, model, opt, torch.Generator(), {{}})
    """)
    for delay in (0.3, 0.45, 0.6, 0.75):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        while proc.stdout.readline().strip() != "ready":   # (Run.create prints when it picks kill-2, ...)
            pass
        time.sleep(delay)
        proc.kill()
        proc.wait()
    for run_dir in tmp_path.iterdir():
        if Run(run_dir).latest_checkpoint() is None:
            continue                                           # killed before its first save
        tensors, meta = load_checkpoint(run_dir)               # sha256 verified
        assert torch.all(tensors["model.weight"] == meta["step"]), "weights belong to their step"
    assert any(Run(d).latest_checkpoint() for d in tmp_path.iterdir()), "some run saved a checkpoint"


def test_8bit_optimizer_state_is_saved_and_resumes_bit_exact(tmp_path):
    """bitsandbytes keeps `step` as an int and its 8-bit blocks in a nested dict: both round-trip."""
    import bitsandbytes as bnb

    def setup():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.Linear(128, 4))
        return model, bnb.optim.AdamW8bit(model.parameters(), lr=1e-2)   # 128x128 >= 4096: 8-bit states

    def steps(model, opt, seeds):
        for s in seeds:
            g = torch.Generator().manual_seed(s)
            x, y = torch.randn(16, 128, generator=g), torch.randn(16, 4, generator=g)
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            opt.step()
    straight, straight_opt = setup()
    steps(straight, straight_opt, range(6))
    model, opt = setup()
    steps(model, opt, range(3))
    assert opt.state[model[0].weight]["state1"].dtype == torch.uint8, "the 8-bit path is exercised"
    run = Run.create(tmp_path, "bnb")
    run.save_checkpoint(3, model, opt, torch.Generator(), {})
    tensors, meta = load_checkpoint(run.path)
    resumed, resumed_opt = setup()
    resumed.load_state_dict(runs.model_state(tensors))
    resumed_opt.load_state_dict(runs.optimizer_state(tensors, meta))
    steps(resumed, resumed_opt, range(3, 6))
    assert weights_equal(straight, resumed)
