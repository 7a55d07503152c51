"""Scale-out: the same loop under torchrun (2 CPU processes, gloo) computes what one process does.

The processes are real: ``python -m torch.distributed.run --nproc_per_node=2 -m labkit.train``
on 127.0.0.1 with a free port. A ``sitecustomize`` audit hook (PEP 578) in every process records
each file it opens for writing, renames, creates or deletes under the output directory, so
"only rank 0 writes" is observed, not assumed.
"""
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from labkit.runs import Run, load_checkpoint, model_state
from labkit.train import TrainConfig, _check_arguments, _local_batch, build_data, build_model, train, train_config

ROOT = Path(__file__).resolve().parents[1]
SPEC = {"run": {"name": "tiny"},
        "data": {"source": "shakespeare", "tokenizer": "char", "max_chars": 20_000},
        "model": {"block_size": 32, "n_layer": 1, "n_head": 2, "n_embd": 32},
        "train": {"steps": 6, "batch_size": 4, "block_size": 32, "warmup_steps": 2, "eval_every": 3,
                  "eval_batches": 2, "checkpoint_every": 3}}

AUDIT = textwrap.dedent("""
    import atexit, json, os, sys
    ROOT, OUT = os.environ["AUDIT_ROOT"], os.environ["AUDIT_OUT"]
    WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    writes = []

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            if not ((mode and any(c in mode for c in "wax+")) or (flags or 0) & WRITE):
                return
        elif event in ("os.rename", "os.mkdir", "os.remove", "os.rmdir"):
            path = args[1] if event == "os.rename" else args[0]
        else:
            return
        if isinstance(path, (str, os.PathLike)) and os.path.abspath(os.fspath(path)).startswith(ROOT):
            writes.append([event, os.fspath(path)])

    def save():
        with open(os.path.join(OUT, f"{os.environ.get('RANK', 'launcher')}-{os.getpid()}.json"), "w") as f:
            json.dump(writes, f)
    sys.addaudithook(hook)
    atexit.register(save)
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(tmp_path, out: Path, *args) -> dict[str, list]:
    """Run ``labkit.train`` in 2 processes; return what each process wrote under ``out``, by rank."""
    site, audit = tmp_path / "site", tmp_path / f"audit-{len(list(tmp_path.glob('audit-*')))}"
    site.mkdir(exist_ok=True)
    audit.mkdir()
    (site / "sitecustomize.py").write_text(AUDIT)
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1",
           "AUDIT_ROOT": str(out.resolve()), "AUDIT_OUT": str(audit)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                           "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "labkit.train",
                           *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "2 process(es) on cpu" in proc.stdout, proc.stdout
    writes = {}
    for f in audit.glob("*.json"):
        writes.setdefault(f.name.split("-")[0], []).extend(json.loads(f.read_text()))
    assert set(writes) == {"launcher", "0", "1"}, f"expected the launcher and 2 ranks: {sorted(writes)}"
    return writes


@pytest.fixture(scope="module")
def single_process():
    """The reference: one process, the same global batch of 4 sequences."""
    cfg = train_config(SPEC["train"])
    data = build_data(SPEC["data"])
    model = build_model(SPEC["model"], data, cfg.seed)
    return train(model, data, cfg, progress=False), model, data


def test_each_rank_takes_its_slice_of_the_same_global_batch(single_process):
    _, _, data = single_process
    cfg = TrainConfig(batch_size=4, block_size=32)
    one = _local_batch(data, "train", cfg, torch.Generator().manual_seed(0), 0, 1, "cpu")
    halves = [_local_batch(data, "train", cfg, torch.Generator().manual_seed(0), r, 2, "cpu") for r in (0, 1)]
    assert halves[0][0].shape == (2, 32) and not torch.equal(halves[0][0], halves[1][0])
    assert torch.equal(torch.cat([h[0] for h in halves]), one[0]) and torch.equal(torch.cat([h[1] for h in halves]), one[1])
    with pytest.raises(ValueError, match="multiple of 3"):
        _check_arguments(cfg, None, False, world=3)
    with pytest.raises(ValueError, match="diag_every=0 under torchrun"):
        _check_arguments(TrainConfig(diag_every=5), None, False, world=2)


def test_two_processes_equal_one_and_only_rank_0_writes(single_process, tmp_path):
    reference, ref_model, _ = single_process
    (tmp_path / "tiny.json").write_text(json.dumps(SPEC))
    out = tmp_path / "out"
    writes = torchrun(tmp_path, out, "--config", "tiny.json", "--out", "out")
    runs = list(out.iterdir())
    assert [p.name for p in runs] == ["tiny"], f"one run directory, made by rank 0: {runs}"
    run = Run(runs[0])
    rows = run.rows()
    assert [r["step"] for r in rows] == list(range(6)), "each step logged once"
    assert [r["loss"] for r in rows] == pytest.approx(reference["loss"], rel=1e-5)
    assert [r["val_loss"] for r in rows if r["val_step"] == r["step"]] == pytest.approx(reference["val_loss"], rel=1e-5)
    tensors, meta = load_checkpoint(run.path)
    assert meta["step"] == 6
    for name, value in model_state(tensors).items():
        torch.testing.assert_close(value, ref_model.state_dict()[name], rtol=1e-4, atol=1e-6)
    assert writes["1"] == [] and writes["launcher"] == [], f"only rank 0 writes: {writes['1'][:3]} {writes['launcher'][:3]}"
    written = {Path(p).name for _, p in writes["0"]}
    assert {"tiny", "launch.json", "config.json", "metrics.csv", "metrics.jsonl", "latest.json"} <= written


def test_a_run_resumes_in_two_processes(single_process, tmp_path):
    """Interrupted after 3 steps in one process, finished in two: the same run, to float rounding."""
    reference, _, data = single_process
    cfg = train_config(SPEC["train"])
    run = Run.create(tmp_path / "out", "tiny")
    model = build_model(SPEC["model"], data, cfg.seed)
    launch = {**SPEC, "model": {**SPEC["model"], "vocab_size": model.cfg.vocab_size}}
    (run.path / "launch.json").write_text(json.dumps(launch))   # as python -m labkit.train writes it

    def interrupt_after_3(step, row):
        if step == 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train(model, data, cfg, run=run, callbacks=[interrupt_after_3], progress=False)
    assert load_checkpoint(run.path)[1]["step"] == 3
    writes = torchrun(tmp_path, tmp_path / "out", "--resume", str(run.path))
    rows = run.rows()
    assert [r["step"] for r in rows] == list(range(6))
    assert [r["loss"] for r in rows] == pytest.approx(reference["loss"], rel=1e-5)
    assert load_checkpoint(run.path)[1]["step"] == 6
    assert writes["1"] == [] and writes["launcher"] == [] and writes["0"], "only rank 0 writes"


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.json")), ids=lambda p: p.name)
def test_shipped_configs_build(path):
    spec = json.loads(path.read_text())
    assert set(spec) == {"run", "data", "model", "train"}, f"{path.name}: run, data, model, train"
    cfg = train_config(spec["train"])
    assert cfg.diag_every == 0 and cfg.batch_size % 8 == 0, "runs unchanged under torchrun, up to 8 processes"

    class Chars:
        class tokenizer:
            vocab_size = 65
    model = build_model(spec["model"], Chars, cfg.seed)
    assert model.cfg.block_size >= cfg.block_size and spec["data"]["source"] == "shakespeare"
