"""Execute notebooks in batch with papermill and write a run summary (``make run``).

    python -m labkit run --profile full --out build/run notebooks/*.ipynb

Executed copies go to ``<out>/<notebook>.ipynb`` (never over ``notebooks/``: a learner's
edits there are never overwritten), and ``<out>/summary.md`` / ``summary.json`` record
seconds and pass/fail per notebook. Figures go where the profile sends them
(``figures/`` for ``full``). Exit status is non-zero if any notebook failed.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from pathlib import Path


@contextlib.contextmanager
def kernel_environment(**changes: str | None):
    """Set (None: unset) environment variables for the kernels started inside the block, then
    put the caller's environment back.

    papermill has no ``env=`` of its own: a kernel inherits this process's environment, so that
    is where the variables must go. Restoring it afterwards keeps them from leaking into the
    rest of the caller (a test session, a notebook that calls ``run_notebooks``).

    >>> import os
    >>> with kernel_environment(LABKIT_DOCTEST="1"):
    ...     os.environ["LABKIT_DOCTEST"]
    '1'
    >>> "LABKIT_DOCTEST" in os.environ
    False
    """
    saved = {name: os.environ.get(name) for name in changes}

    def apply(values):
        for name, value in values.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    apply(changes)
    try:
        yield
    finally:
        apply(saved)


def run_notebooks(paths: list[Path], out: Path, profile: str, kernel: str | None = None) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    # LABKIT_BATCH: live plots degrade to one static plot.
    # LABKIT_PROFILE: the profile goes through the environment, not a papermill parameter: a
    # parameter would inject a `PROFILE = "full"` cell into the executed copy, and a copy
    # committed with it would then ignore $LABKIT_PROFILE and run the full profile under
    # `make test`.
    # MPLBACKEND unset: executed copies are for reading, so figures must be embedded, which
    # needs the kernel's inline backend (MPLBACKEND=Agg, as the tests set it, would leave every
    # figure out).
    with kernel_environment(LABKIT_BATCH="1", LABKIT_PROFILE=profile, MPLBACKEND=None):
        return [_run_one(path, out, profile, kernel) for path in paths]


def _run_one(path: Path, out: Path, profile: str, kernel: str | None) -> dict:
    import papermill as pm

    t0 = time.perf_counter()
    error = None
    try:
        pm.execute_notebook(str(path), str(out / path.name), kernel_name=kernel,
                            cwd=str(path.parent), progress_bar=False)
    except Exception as err:  # papermill raises PapermillExecutionError with the cell's error
        error = f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"
    seconds = time.perf_counter() - t0
    print(f"{'PASS' if error is None else 'FAIL'} {path.name:45s} {seconds:7.1f} s"
          + (f"  {error}" if error else ""), flush=True)
    return {"notebook": path.name, "profile": profile, "seconds": round(seconds, 1),
            "passed": error is None, "error": error}


def write_summary(results: list[dict], out: Path) -> None:
    (out / "summary.json").write_text(json.dumps(results, indent=1))
    lines = ["| notebook | profile | seconds | result |", "|---|---|---:|---|"]
    lines += [f"| {r['notebook']} | {r['profile']} | {r['seconds']:.1f} | "
              f"{'pass' if r['passed'] else 'FAIL: ' + (r['error'] or '')} |" for r in results]
    total = sum(r["seconds"] for r in results)
    lines.append(f"\n{sum(r['passed'] for r in results)}/{len(results)} passed in {total:.0f} s")
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m labkit run", description=__doc__.split("\n")[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--profile", default="full", choices=["smoke", "full"])
    parser.add_argument("--out", type=Path, default=Path("build/run"))
    parser.add_argument("--kernel", default=None, help="Jupyter kernel (default: the notebook's)")
    args = parser.parse_args(argv)
    if args.out.resolve() in {p.parent.resolve() for p in args.notebooks}:
        parser.error("--out must not be the notebooks' own folder: executed copies would "
                     "overwrite the notebooks (and a learner's edits)")
    results = run_notebooks(args.notebooks, args.out, args.profile, args.kernel)
    write_summary(results, args.out)
    print(f"summary: {args.out / 'summary.md'}")
    return 0 if all(r["passed"] for r in results) else 1

