"""Learn by doing: exercises with checkers, a self-check per part, verdicts on predictions.

In a notebook (``from labkit import exercises as ex``)::

    # ✏️ EXERCISE 03.1 — the causal mask. Write the body; the checker says what is wrong.
    def causal_mask(T: int) -> torch.Tensor:
        return ex.reference("03.causal_mask")(T)   # ← delete this line and write your own
    ex.check("03.causal_mask", causal_mask)

``check`` prints one ✓ line, or what is wrong (the hint of a recognised typical mistake, the
first failing case, expected vs got); in JupyterLab a "Show solution" button follows. A failure
never raises for a learner, but does in batch runs (``$LABKIT_BATCH=1``: ``make test``,
``make run``), where it means the committed reference is broken. ``solution(id)`` prints the
reference (hidden until asked for) and the typical mistakes the checker recognises.

Each notebook's exercises live in one module here, ``n<prefix>_<topic>.py`` (``n03_attention``,
``na1_qlora``); modules starting with ``_`` are the framework. Every public module is imported
when an exercise is first looked up, so the registry always holds them all (the tests
parametrize over it). ``SelfCheck`` is the end-of-part self-assessment; ``verdict`` prints the
verdict on a Predict cell.
"""
from __future__ import annotations

import difflib
import importlib
import pkgutil

from ._core import Case, CheckResult, Exercise, ExerciseFailed, Mistake
from ..claims import verdict   # one verdict helper for the whole lab (labkit.claims)
from ._selfcheck import Question, SelfCheck

_REGISTRY: dict[str, Exercise] = {}
_loaded = False


def exercise(id: str, title: str, cases, **options):
    """Decorator: make the decorated function the reference of a new registered exercise.

    ``id`` is ``"<notebook prefix>.<name>"`` (``"03.causal_mask"``); ``cases`` a list of
    ``Case`` or a function of a seeded ``torch.Generator`` returning one; ``options``:
    ``atol``, ``rtol``, ``output_names`` (see ``Exercise``). Returns the ``Exercise``, whose
    ``.mistake(hint)`` decorator registers the typical mistakes.
    """
    def register(reference) -> Exercise:
        if id in _REGISTRY:
            raise ValueError(f"exercise {id!r} is registered twice: once in "
                             f"{_REGISTRY[id].reference.__module__}, again in {reference.__module__}")
        ex = Exercise(id, title, reference, cases, **options)
        _REGISTRY[id] = ex
        return ex
    return register


def registry() -> dict[str, Exercise]:
    """Every exercise of every notebook, by id (imports each notebook's module once)."""
    global _loaded
    if not _loaded:
        for mod in pkgutil.iter_modules(__path__):
            if not mod.name.startswith("_"):
                importlib.import_module(f"{__name__}.{mod.name}")
        _loaded = True
    return _REGISTRY


def get(id: str) -> Exercise:
    """The exercise ``id``; an unknown id names the closest registered ones."""
    reg = registry()
    if id not in reg:
        close = difflib.get_close_matches(id, reg, n=3, cutoff=0.5)
        same_nb = sorted(k for k in reg if k.split(".")[0] == id.split(".")[0])
        raise KeyError(f"no exercise {id!r}" + (f"; did you mean {close}?" if close else "")
                       + (f" (this notebook's exercises: {same_nb})" if same_nb else ""))
    return reg[id]


def reference(id: str):
    """The reference solution of exercise ``id``, as a function (the committed notebooks call it)."""
    return get(id).reference


def solution(id: str) -> None:
    """Print the reference solution of ``id`` and the typical mistakes its checker recognises."""
    print(solution_text(id))


def solution_text(id: str) -> str:
    ex = get(id)
    lines = [f"# Reference solution of {ex.id} — {ex.title}", ex.source(), "",
             "# Typical mistakes the checker recognises:"]
    lines += [f"#  - {m.hint}" for m in ex.mistakes]
    return "\n".join(lines)


def check(id: str, fn, *, raise_on_fail: bool | None = None) -> None:
    """Run exercise ``id``'s checker on ``fn`` and print the verdict (see the module docstring).

    ``raise_on_fail`` (default: in batch runs only) raises ``ExerciseFailed`` on a failure.
    """
    from ..plotting import in_batch_run
    result = get(id).run(fn)
    print(result.message)
    batch = in_batch_run()
    if not batch:
        _solution_button(id)
    if not result.passed and (batch if raise_on_fail is None else raise_on_fail):
        raise ExerciseFailed(result.message)


def _solution_button(id: str) -> None:
    """A "Show solution" button under the verdict (JupyterLab only: ipywidgets, offline)."""
    import ipywidgets as widgets
    from IPython.display import Code, display
    button = widgets.Button(description="Show solution", icon="eye", tooltip=f"reveal the reference of {id}")
    out = widgets.Output()

    def reveal(_):
        button.disabled = True
        with out:
            display(Code(solution_text(id), language="python"))

    button.on_click(reveal)
    display(widgets.VBox([button, out]))


__all__ = ["Case", "CheckResult", "Exercise", "ExerciseFailed", "Mistake", "Question", "SelfCheck",
           "check", "exercise", "get", "reference", "registry", "solution", "solution_text", "verdict"]
