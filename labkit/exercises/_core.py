"""The exercise checker: run a learner's function on every case, say in words what is wrong.

An exercise is a reference function plus the cases to run it on and the typical mistakes
learners make, each a wrong function with a hint::

    @exercise("03.causal_mask", "the causal mask", cases=[Case(1), Case(2), Case(5)])
    def causal_mask(T):
        return torch.ones(T, T, dtype=torch.bool).tril()

    @causal_mask.mistake("mask is off by one: position t must see itself (tril(), not tril(-1))")
    def _(T):
        return torch.ones(T, T, dtype=torch.bool).tril(-1)

``Exercise.run(fn)`` calls ``fn`` and the reference on fresh copies of every case's inputs and
compares what they did: the output (type, shape, dtype, NaN/inf, values within tolerance) and
the inputs afterwards (a function must not modify its inputs in place). On a failure it looks
for the mistake that behaves exactly like ``fn`` on every case and gives its hint; otherwise it
names the first failing case, what was expected, what came back, and the largest error.
"""
from __future__ import annotations

import copy
import inspect
import math
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

SHOW_ELEMENTS = 64          # print tensors up to this many entries in full; bigger ones are summarised


class Case:
    """One call of the function under test: ``Case(x, dim=0, label="dim=0: columns sum to 1")``.

    The label says what the case tests (an edge case should say which edge); without one the
    arguments are summarised.
    """

    def __init__(self, *args, label: str | None = None, **kwargs):
        self.args, self.kwargs, self.label = args, kwargs, label

    def __repr__(self) -> str:
        return f"Case({self.label or _call_summary(self.args, self.kwargs)})"


@dataclass
class Mistake:
    """A typical wrong implementation and the hint a learner who made it needs."""
    hint: str
    fn: Callable


@dataclass
class Behaviour:
    """What one call did: its output or the exception it raised, and the inputs afterwards."""
    output: Any = None
    error: BaseException | None = None
    inputs_after: tuple = ()
    where: str = ""                 # the learner's line that raised, if any


@dataclass
class CheckResult:
    """The outcome of ``Exercise.run``: ``passed``, the ``hint`` of a recognised mistake (or
    None), ``sure`` (the mistake matched on every case, not only on the first failing one) and
    the full ``message`` a learner reads. ``str(result)`` is the message."""
    exercise: "Exercise"
    passed: bool
    message: str
    hint: str | None = None
    sure: bool = False
    failing_cases: list[int] = field(default_factory=list)

    def __str__(self) -> str:
        return self.message

    def __bool__(self) -> bool:
        return self.passed


class ExerciseFailed(AssertionError):
    """A check failed in a batch run (papermill, nbval): the committed reference is broken."""


class Exercise:
    """A reference function, its cases, its comparison and its typical mistakes (see module doc).

    ``atol``/``rtol``: float outputs match within ``atol + rtol * |expected|`` (bool and integer
    outputs must match exactly). ``output_names`` names the parts of a tuple output in messages.
    """

    def __init__(self, id: str, title: str, reference: Callable, cases, *, atol: float = 1e-5,
                 rtol: float = 1e-4, output_names: tuple[str, ...] | None = None):
        self.id, self.title, self.reference = id, title, reference
        self._cases, self._case_list = cases, None
        self.atol, self.rtol, self.output_names = atol, rtol, output_names
        self.mistakes: list[Mistake] = []

    def __repr__(self) -> str:
        return f"Exercise({self.id!r}, {self.title!r}, {len(self.cases)} cases, {len(self.mistakes)} mistakes)"

    # --- defining an exercise --------------------------------------------------------------
    def mistake(self, hint: str):
        """Decorator: register a typical wrong implementation and the hint that fixes it."""
        def register(fn: Callable) -> Callable:
            self.mistakes.append(Mistake(hint, fn))
            return fn
        return register

    @property
    def cases(self) -> list[Case]:
        """The cases, built once (``cases`` may be a list or a function of a seeded Generator)."""
        if self._case_list is None:
            made = self._cases(torch.Generator().manual_seed(0)) if callable(self._cases) else self._cases
            self._case_list = list(made)
        return self._case_list

    def source(self) -> str:
        """The reference's source, without the ``@exercise(...)`` decorator."""
        lines = inspect.getsource(self.reference).splitlines()
        start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("def "))
        return "\n".join(lines[start:])

    # --- running it ------------------------------------------------------------------------
    def behave(self, fn: Callable, case: Case) -> Behaviour:
        """Call ``fn`` on a fresh copy of ``case``'s inputs; record output or exception, and inputs after."""
        args, kwargs = copy.deepcopy(case.args), copy.deepcopy(case.kwargs)
        try:
            out = fn(*args, **kwargs)
        except Exception as err:  # the learner's code may raise anything: that is a diagnosis
            return Behaviour(error=err, inputs_after=(args, kwargs), where=_learner_line(err, fn))
        return Behaviour(output=out, inputs_after=(args, kwargs))

    def diff(self, expected: Behaviour, got: Behaviour, case: Case) -> str | None:
        """None if ``got`` behaved like ``expected`` on ``case``; else what differs, in words."""
        if got.error is not None:
            if expected.error is not None and type(got.error) is type(expected.error):
                return None
            return (f"raised {type(got.error).__name__}: {got.error}"
                    + (f"\n    at: {got.where}" if got.where else ""))
        if expected.error is not None:
            return f"should raise {type(expected.error).__name__} ({expected.error}) but returned normally"
        problem = _diff(expected.output, got.output, "output", self.atol, self.rtol, self.output_names)
        if problem:
            return problem
        names = _input_names(self.reference, case)
        for name, before, e_after, g_after in zip(names, _flat(case.args, case.kwargs),
                                                  _flat(*expected.inputs_after), _flat(*got.inputs_after)):
            if _diff(e_after, g_after, name, 0.0, 0.0) is not None:
                if _diff(before, g_after, name, 0.0, 0.0) is not None:
                    return (f"modified its input `{name}` in place: the caller's tensor changed. Work on a "
                            f"new tensor (y = x - m), not in place (x -= m, x.exp_(), x[...] = ...)")
                return f"left its input `{name}` unchanged where it should modify it in place"
        return None

    def run(self, fn: Callable) -> CheckResult:
        """Check ``fn`` against the reference on every case (see the module docstring)."""
        header = f"{self.id} — {self.title}"
        if not callable(fn):
            return CheckResult(self, False, f"✗ {header}: expected a function, got {type(fn).__name__}")
        cases = self.cases
        problem = _signature_problem(fn, self.reference, cases[0])
        if problem:
            return CheckResult(self, False, f"✗ {header}\n  {problem}", failing_cases=[0])
        expected = [self.behave(self.reference, c) for c in cases]
        got = [self.behave(fn, c) for c in cases]
        diffs = [self.diff(e, g, c) for e, g, c in zip(expected, got, cases)]
        failing = [i for i, d in enumerate(diffs) if d is not None]
        if not failing:
            labels = ", ".join(_case_label(c).split(":")[0].split(" (")[0] for c in cases)
            note = ("  (this is the reference solution: delete the `ex.reference(...)` line and write your own)"
                    if _calls_reference(fn) else "")
            return CheckResult(self, True, f"✓ {header}: correct on all {len(cases)} cases ({labels}){note}")
        hint, sure = self._recognise(got, failing)
        first = failing[0]
        lines = [f"✗ {header}: wrong on {len(failing)} of {len(cases)} cases."]
        if hint:
            lines.append(f"  Hint: {hint}" if sure else f"  Possibly: {hint}")
        lines.append(f"  First failing case — {_case_label(cases[first])}:")
        lines += [f"    {line}" for line in _inputs_summary(self.reference, cases[first])]
        lines.append(f"  {_sentence(diffs[first])}")
        if got[first].error is None and expected[first].error is None:
            lines += _expected_vs_got(expected[first].output, got[first].output)
        lines.append(f'  Stuck? ex.solution("{self.id}") shows the reference.')
        return CheckResult(self, False, "\n".join(lines), hint=hint, sure=sure, failing_cases=failing)

    def _recognise(self, got: list[Behaviour], failing: list[int]) -> tuple[str | None, bool]:
        """The hint of the mistake that behaves like ``got`` on every case (sure), else of one that
        behaves like it on the first failing case (possibly), else None."""
        first = failing[0]
        maybe = None
        for m in self.mistakes:
            same = [self.diff(self.behave(m.fn, c), g, c) is None for c, g in zip(self.cases, got)]
            if all(same):
                return m.hint, True
            if maybe is None and same[first]:
                maybe = m.hint
        return maybe, False


# --- comparing values, in words ----------------------------------------------------------------

def _diff(expected, got, name: str, atol: float, rtol: float, names=None) -> str | None:
    """None if ``got`` matches ``expected``; else one sentence about the first difference."""
    if got is None and expected is not None:
        return "returned None: did you forget the `return` statement?"
    if isinstance(expected, np.ndarray) and isinstance(got, np.ndarray):
        expected, got = torch.from_numpy(expected), torch.from_numpy(got)
    if isinstance(expected, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            return f"returned a {type(got).__name__} as {name}, expected a torch.Tensor"
        return _diff_tensor(expected, got, name, atol, rtol)
    if isinstance(expected, (tuple, list)):
        if not isinstance(got, (tuple, list)):
            return f"returned a {type(got).__name__} as {name}, expected a {type(expected).__name__} of {len(expected)}"
        if len(got) != len(expected):
            return f"returned {len(got)} values as {name}, expected {len(expected)}"
        for i, (e, g) in enumerate(zip(expected, got)):
            part = f"{name} `{names[i]}`" if names and i < len(names) else f"{name}[{i}]"
            problem = _diff(e, g, part, atol, rtol)
            if problem:
                return problem
        return None
    if isinstance(expected, dict):
        if not isinstance(got, dict):
            return f"returned a {type(got).__name__} as {name}, expected a dict"
        if set(got) != set(expected):
            return (f"{name} has keys {sorted(map(str, got))[:8]}, expected {sorted(map(str, expected))[:8]}")
        for key in expected:
            problem = _diff(expected[key], got[key], f"{name}[{key!r}]", atol, rtol)
            if problem:
                return problem
        return None
    if isinstance(expected, (bool, np.bool_)) or isinstance(got, (bool, np.bool_)):
        return None if expected == got else f"{name} is {got!r}, expected {expected!r}"
    if isinstance(expected, (int, float, np.number)):
        if isinstance(got, torch.Tensor) and got.numel() == 1:
            got = got.item()
        if not isinstance(got, (int, float, np.number)):
            return f"returned a {type(got).__name__} as {name}, expected a number"
        if isinstance(expected, (int, np.integer)) and isinstance(got, (int, np.integer)):
            return None if expected == got else f"{name} is {got}, expected {expected}"
        e, g = float(expected), float(got)
        if e == g or (math.isnan(e) and math.isnan(g)) or abs(g - e) <= atol + rtol * abs(e):
            return None
        return f"{name} is {g:.6g}, expected {e:.6g} (error {abs(g - e):.3g})"
    return None if expected == got else f"{name} is {_short(got)}, expected {_short(expected)}"


def _diff_tensor(e: torch.Tensor, g: torch.Tensor, name: str, atol: float, rtol: float) -> str | None:
    if tuple(g.shape) != tuple(e.shape):
        return f"{name} has the wrong shape: expected {tuple(e.shape)}, got {tuple(g.shape)}"
    if g.dtype != e.dtype:
        return f"{name} has the wrong dtype: expected {e.dtype}, got {g.dtype}"
    e, g = e.detach().cpu(), g.detach().cpu()
    if not (e.is_floating_point() or e.is_complex()):
        bad = e != g
        if not bad.any():
            return None
        i = _index(bad)
        return (f"{name} is wrong at {int(bad.sum())} of {e.numel()} entries "
                f"(first at {i}: expected {e[i].item()}, got {g[i].item()})")
    for what, test in (("NaN", torch.isnan), ("inf", torch.isinf)):
        extra = test(g) & ~test(e)
        if extra.any():
            i = _index(extra)
            return (f"{name} contains {what} at {int(extra.sum())} of {e.numel()} entries where the reference "
                    f"has a number (first at {i}: expected {e[i].item():.4g})")
        missing = test(e) & ~test(g)
        if missing.any():
            i = _index(missing)
            return (f"{name} should be {what} at {int(missing.sum())} entries "
                    f"(first at {i}) but is {g[i].item():.4g} there")
    finite = torch.isfinite(e)
    err = torch.where(finite, (g - e).abs(), torch.zeros_like(e))
    bad = (err > atol + rtol * e.abs()) | (torch.isinf(e) & (g != e))
    if not bad.any():
        return None
    i = _index(torch.where(bad, err, torch.full_like(err, -1.0)) == err.max()) if err.max() > 0 else _index(bad)
    return (f"{name} has wrong values at {int(bad.sum())} of {e.numel()} entries; the largest error is "
            f"{err.max().item():.3g} at {i} (expected {e[i].item():.4g}, got {g[i].item():.4g})")


def _index(mask: torch.Tensor) -> tuple[int, ...]:
    """The first True position of a boolean tensor, as a tuple (a scalar tensor gives ())."""
    return tuple(int(v) for v in mask.nonzero()[0]) if mask.ndim else ()


def _short(x, width: int = 60) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor {tuple(x.shape)} {x.dtype}"
    text = repr(x)
    return text if len(text) <= width else text[:width - 3] + "..."


def _fmt(x) -> str:
    """A value as a learner wants to read it: small tensors in full, big ones summarised."""
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu()
        head = f"{str(t.dtype).replace('torch.', '')} {tuple(t.shape)}"
        if t.numel() <= SHOW_ELEMENTS:
            arr = t.int().numpy() if t.dtype == torch.bool else t.numpy()
            body = np.array2string(arr, precision=4, suppress_small=True, separator=", ", max_line_width=100)
            return f"{head}\n" + "\n".join("      " + line for line in body.splitlines())
        finite = t[torch.isfinite(t)] if t.is_floating_point() else t
        stats = (f" min {finite.min().item():.4g}, max {finite.max().item():.4g}" if finite.numel() else "")
        return head + stats
    return _short(x, 200)


def _expected_vs_got(expected, got) -> list[str]:
    if isinstance(expected, (tuple, list)) and isinstance(got, (tuple, list)) and len(expected) == len(got):
        for e, g in zip(expected, got):                      # show the first part that differs
            if _diff(e, g, "", 0, 0) is not None:
                return _expected_vs_got(e, g)
        return []
    return [f"    expected: {_fmt(expected)}", f"    got:      {_fmt(got)}"]


# --- calling the learner's function ------------------------------------------------------------

def _sentence(problem: str) -> str:
    """'output has ...' -> 'Your output has ...'; 'returned None ...' -> 'Your function returned None ...'."""
    return f"Your {problem}" if problem.startswith("output") else f"Your function {problem}"


def _call_summary(args, kwargs) -> str:
    def one(v):
        if isinstance(v, torch.Tensor):
            return f"{str(v.dtype).replace('torch.', '')} {tuple(v.shape)}"
        return _short(v, 30)
    return ", ".join([one(a) for a in args] + [f"{k}={one(v)}" for k, v in kwargs.items()])


def _case_label(case: Case) -> str:
    return case.label or _call_summary(case.args, case.kwargs)


def _flat(args, kwargs) -> list:
    return list(args) + [kwargs[k] for k in kwargs]


def _input_names(reference: Callable, case: Case) -> list[str]:
    """The names of ``case``'s inputs, from the reference's parameters."""
    params = list(inspect.signature(reference).parameters)
    return [params[i] if i < len(params) else f"argument {i}" for i in range(len(case.args))] + list(case.kwargs)


def _inputs_summary(reference: Callable, case: Case) -> list[str]:
    names = _input_names(reference, case)
    width = max(len(n) for n in names) if names else 1
    return [f"{n:<{width}} = {_fmt(v)}" for n, v in zip(names, _flat(case.args, case.kwargs))]


def _signature_problem(fn: Callable, reference: Callable, case: Case) -> str | None:
    try:
        inspect.signature(fn).bind(*case.args, **case.kwargs)
    except TypeError as err:
        return (f"Your function cannot be called the way the checker calls it "
                f"({reference.__name__}({_call_summary(case.args, case.kwargs)})): {err}.\n"
                f"  It should have the signature {reference.__name__}{inspect.signature(reference)}")
    except ValueError:      # builtins without a signature: just call them
        return None
    return None


def _learner_line(err: BaseException, fn: Callable) -> str:
    """The line of the learner's own code that raised (the deepest frame in fn's file)."""
    code = getattr(fn, "__code__", None)
    frames = traceback.extract_tb(err.__traceback__)
    mine = [f for f in frames if code is not None and f.filename == code.co_filename]
    return f"`{mine[-1].line}`" if mine and mine[-1].line else ""


def _calls_reference(fn: Callable) -> bool:
    """True if ``fn``'s body still calls ``ex.reference(...)`` (the committed notebook's stand-in)."""
    try:
        return "reference(" in inspect.getsource(fn)
    except (OSError, TypeError):
        return False
