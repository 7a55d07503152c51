"""Checkers are tested like code: every registered exercise's checker accepts its reference and
rejects each of its typical mistakes with that mistake's hint; the generic diagnoses say what is
wrong; the self-check grades; the widgets redraw with the values their controls hold."""
import math
import re
from pathlib import Path

import matplotlib
import pytest
import torch

from labkit import exercises as ex
from labkit.exercises import Case, Exercise, ExerciseFailed, SelfCheck

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_PREFIXES = {p.name.split("_")[0] for p in (ROOT / "notebooks").glob("*.ipynb")}
REGISTRY = ex.registry()
MISTAKES = [(e.id, i) for e in REGISTRY.values() for i in range(len(e.mistakes))]


# --- every registered exercise ------------------------------------------------------------------

def test_the_registry_is_not_empty():
    assert REGISTRY, "no exercise registered: labkit/exercises/n*.py should define them"


@pytest.mark.parametrize("id", sorted(REGISTRY))
def test_the_checker_accepts_the_reference(id):
    result = REGISTRY[id].run(REGISTRY[id].reference)
    assert result.passed, f"the reference of {id} fails its own checker:\n{result}"
    assert result.message.startswith(f"✓ {id}") and "\n" not in result.message, \
        f"a passing check prints one ✓ line, got:\n{result}"


@pytest.mark.parametrize("id", sorted(REGISTRY))
def test_each_exercise_is_complete(id):
    """≥ 2 typical mistakes with distinct hints, ≥ 3 cases, an id that names its notebook."""
    e = REGISTRY[id]
    assert len(e.mistakes) >= 2, f"{id} registers {len(e.mistakes)} typical mistake(s); at least 2 are required"
    hints = [m.hint for m in e.mistakes]
    assert len(set(hints)) == len(hints) and all(len(h) > 20 for h in hints), f"{id}: hints must be distinct sentences"
    assert len(e.cases) >= 3, f"{id} has {len(e.cases)} cases; at least 3 (edge cases included) are required"
    prefix, _, name = id.partition(".")
    assert prefix in NOTEBOOK_PREFIXES and re.fullmatch(r"[a-z][a-z0-9_]*", name), \
        f"id {id!r} must be '<notebook prefix>.<snake_case name>' with a notebook notebooks/{prefix}_*.ipynb"
    module = e.reference.__module__.rsplit(".", 1)[-1]
    assert module.startswith(f"n{prefix.lower()}_"), f"{id} must live in labkit/exercises/n{prefix.lower()}_<topic>.py, not {module}"
    text = ex.solution_text(id)
    assert f"def {e.reference.__name__}(" in text and "@exercise" not in text and all(h in text for h in hints)


@pytest.mark.parametrize("id,index", MISTAKES, ids=[f"{i}-mistake{k}" for i, k in MISTAKES])
def test_the_checker_rejects_each_typical_mistake_with_its_hint(id, index):
    e = REGISTRY[id]
    mistake = e.mistakes[index]
    result = e.run(mistake.fn)
    assert not result.passed, f"{id}: the checker accepts the typical mistake {mistake.hint!r}"
    assert result.sure and result.hint == mistake.hint, \
        (f"{id}: mistake {index} should get its own hint {mistake.hint!r}; the checker said:\n{result}\n"
         f"(two mistakes that behave the same on every case cannot be told apart: add a case that separates them)")
    assert f"Hint: {mistake.hint}" in result.message and "First failing case" in result.message


# --- the generic diagnoses, on a small exercise of the test's own (not registered) -------------

def _normalize(x: torch.Tensor) -> torch.Tensor:
    """x / sum(x) over the last axis."""
    return x / x.sum(-1, keepdim=True)


TOY = Exercise("99.normalize", "normalise rows", _normalize,
               cases=[Case(torch.tensor([[1.0, 3.0], [2.0, 2.0]]), label="two rows"),
                      Case(torch.ones(1, 4), label="one row"), Case(torch.arange(1.0, 7.0).view(2, 3))])
TOY.mistake("divided by the max, not the sum: rows must sum to 1")(lambda x: x / x.amax(-1, keepdim=True))


def run(fn):
    return TOY.run(fn)


def test_a_known_mistake_gets_its_hint_and_the_first_failing_case():
    r = run(lambda x: x / x.amax(-1, keepdim=True))
    assert not r.passed and r.sure and "Hint: divided by the max" in r.message
    assert "two rows" in r.message and "expected:" in r.message and "got:" in r.message


def test_returning_none_is_named():
    def f(x):
        x / x.sum(-1, keepdim=True)
    assert "returned None: did you forget the `return` statement?" in run(f).message


def test_wrong_shape_and_dtype_say_expected_vs_got():
    assert "wrong shape: expected (2, 2), got (2,)" in run(lambda x: x.sum(-1)).message
    assert "wrong dtype: expected torch.float32, got torch.float64" in run(lambda x: _normalize(x.double())).message


def test_nan_is_named_where_the_reference_has_numbers():
    msg = run(lambda x: x / (x.sum(-1, keepdim=True) - x.sum(-1, keepdim=True))).message
    assert "contains NaN" in msg or "contains inf" in msg


def test_wrong_values_give_the_largest_error_and_where():
    msg = run(lambda x: x / x.sum()).message
    assert "wrong values at" in msg and "largest error" in msg and "(expected " in msg


def test_in_place_modification_is_caught_even_with_the_right_output():
    def f(x):
        x /= x.sum(-1, keepdim=True)
        return x.clone()
    msg = run(f).message
    assert "modified its input `x` in place" in msg, msg


def test_an_exception_names_the_learners_line():
    def f(x):
        total = x.sum(-1, keepdim=True)  # noqa: F841  (the typo below is the point)
        return x / totl  # noqa: F821  (the typo is the point)
    msg = run(f).message
    assert "raised NameError" in msg and "`return x / totl" in msg, msg


def test_a_wrong_signature_says_how_the_checker_calls():
    msg = run(lambda x, y: x).message
    assert "cannot be called the way the checker calls it" in msg and "_normalize(x: torch.Tensor)" in msg


def test_a_mistake_matching_only_the_first_failing_case_is_a_possibility():
    def f(x):   # the max mistake on the first case, something else on the others
        return x / x.amax(-1, keepdim=True) if x.shape == (2, 2) and x[0, 0] == 1 else x * 0
    r = run(f)
    assert not r.sure and r.hint and "Possibly: divided by the max" in r.message


def test_tuples_numbers_and_named_outputs():
    pair = Exercise("99.pair", "pair", lambda x: (x.sum(), float(x.mean())),
                    cases=[Case(torch.ones(3)), Case(torch.arange(3.0)), Case(torch.zeros(2))],
                    output_names=("total", "mean"))
    assert pair.run(lambda x: (x.sum(), float(x.mean()))).passed
    assert "output `mean` is" in pair.run(lambda x: (x.sum(), float(x.mean()) + 1)).message
    assert "returned 1 values as output, expected 2" in pair.run(lambda x: (x.sum(),)).message


def test_the_reference_stand_in_is_pointed_out():
    def normalize(x):
        return ex.reference("03.softmax")(x.log())    # what a committed notebook's exercise cell does
    r = TOY.run(normalize)
    assert r.passed and "this is the reference solution" in r.message


# --- check(): prints, raises only in batch runs --------------------------------------------------

def test_check_prints_one_line_when_right(capsys):
    ex.check("03.causal_mask", ex.reference("03.causal_mask"), raise_on_fail=True)
    out = capsys.readouterr().out.strip()
    assert out.startswith("✓ 03.causal_mask") and "\n" not in out


def test_check_never_raises_for_a_learner_but_raises_in_batch_runs(capsys, monkeypatch):
    wrong = lambda T: torch.ones(T, T, dtype=torch.bool).tril(-1)   # noqa: E731
    ex.check("03.causal_mask", wrong, raise_on_fail=False)
    assert "off by one" in capsys.readouterr().out
    monkeypatch.setenv("LABKIT_BATCH", "1")
    with pytest.raises(ExerciseFailed, match="off by one"):
        ex.check("03.causal_mask", wrong)


def test_an_unknown_id_suggests_the_closest():
    with pytest.raises(KeyError, match=r"03\.causal_mask"):
        ex.get("03.casual_mask")


def test_an_id_registered_twice_is_refused():
    with pytest.raises(ValueError, match="registered twice"):
        ex.exercise("03.causal_mask", "again", cases=[Case(1)])(lambda T: T)


# --- self-check -----------------------------------------------------------------------------------

def quiz() -> SelfCheck:
    q = SelfCheck("99", "Self-check: test")
    q.numeric("std", "std of q·k at d=64?", answer=7.9, tol=1.0, explain="var(q·k) = d, so std = √64 = 8")
    q.numeric("ratio", "gradient ratio?", answer=700.0, rel=0.2, explain="measured 700x")
    q.choice("mask", "nn.MultiheadAttention reads True as?", ["may attend", "blocked"], "blocked",
             explain="True = blocked for nn.MultiheadAttention")
    return q


def test_the_measured_answers_are_accepted(capsys):
    q = quiz()
    answers = {k: q.answer(k) for k in q.questions}
    assert answers == {"std": 7.9, "ratio": 700.0, "mask": "b"}
    q.check(answers, raise_on_fail=True)
    assert "3/3 right ✓" in capsys.readouterr().out
    assert q.report({"std": 8.5, "ratio": 600, "mask": "blocked"})[0] == 3       # within tolerance; text or letter


def test_a_wrong_answer_gets_the_explanation(capsys):
    q = quiz()
    q.check({"std": 64, "ratio": 700, "mask": "a"}, raise_on_fail=False)
    out = capsys.readouterr().out
    assert "1/3 right" in out and "✗ std: you said 64" in out and "Why: var(q·k) = d" in out
    assert "✗ mask: you said a) may attend" in out and "Why: True = blocked" in out
    with pytest.raises(ExerciseFailed):
        q.check({"std": 64}, raise_on_fail=True)


def test_unanswered_and_invalid_answers_are_said_so():
    q = quiz()
    _, text = q.report({"std": None, "ratio": "lots", "mask": "z"})
    assert "– std: not answered" in text and "not a number" in text and "not one of the options" in text
    with pytest.raises(KeyError, match="no question"):
        q.report({"typo": 1})


def test_a_badly_built_question_is_refused():
    q = SelfCheck("99", "t")
    with pytest.raises(ValueError, match="exactly one of tol"):
        q.numeric("a", "?", 1.0, explain="")
    with pytest.raises(ValueError, match="not one of the options"):
        q.choice("b", "?", ["x", "y"], "z", explain="")
    with pytest.raises(ValueError, match="needs a number"):
        q.numeric("c", "?", math.nan, tol=1, explain="")


def test_the_self_check_widget_grades_what_was_entered():
    q = quiz()
    q.widget(live=True)
    rows = q.widget_box.children
    boxes = {w.description: w for w in rows if hasattr(w, "description") and w.description in q.questions}
    boxes["std"].value, boxes["ratio"].value, boxes["mask"].value = "8", "10", "b"
    assert q.report({k: b.value for k, b in boxes.items()})[0] == 2
    assert q.widget(live=False) is None


def test_verdict_phrases_are_what_the_contract_looks_for():
    assert ex.verdict(True) == "✓ prediction held"
    assert ex.verdict(False).startswith("✗ prediction missed")


# --- widgets ----------------------------------------------------------------------------------------

def test_explore_draws_once_with_the_defaults_in_batch_runs():
    from labkit.widgets import explore
    calls = []

    def draw(a=2, b="x"):
        calls.append((a, b))
        return plt.figure()
    e = explore(draw, a=(0, 5), b=["x", "y"], live=False)
    assert calls == [(2, "x")] and e.widget is None and e.redraws == 1


def test_explore_redraws_on_every_change_when_live():
    from labkit.widgets import explore
    calls = []

    def draw(a=2, flag=True):
        calls.append((a, flag))
        return plt.figure()
    e = explore(draw, a=(0, 5), flag=True, live=True)
    a, flag = e.widget.kwargs_widgets
    a.value = 4
    flag.value = False
    assert calls == [(2, True), (4, True), (4, False)] and e.values == {"a": 4, "flag": False}
    assert not a.continuous_update, "sliders should redraw when a drag ends, not at every pixel"


def test_explore_refuses_controls_without_a_default_or_a_parameter():
    from labkit.widgets import explore
    with pytest.raises(TypeError, match="default for 'a'"):
        explore(lambda a: plt.figure(), a=(0, 3), live=False)
    with pytest.raises(TypeError, match="no parameter"):
        explore(lambda a=1: plt.figure(), b=(0, 3), live=False)


def test_softmax_explorer_calls_the_notebooks_function_with_the_scale_it_shows():
    from labkit.widgets import softmax_explorer
    seen = []

    def weights(q, k, scale):
        seen.append((q.shape[-1], scale))
        return (q @ k.transpose(-2, -1) * scale).softmax(-1)
    e = softmax_explorer(weights, live=True, n_rows=8)
    d, temperature, scaled = e.widget.kwargs_widgets
    seen.clear()
    temperature.value = 2.0
    assert (64, pytest.approx(1 / (8 * 2.0))) in seen
    seen.clear()
    scaled.value, d.value = False, 1024
    assert (1024, pytest.approx(1 / 2.0)) in seen


def test_head_explorer_takes_a_tensor_or_a_tuple_per_layer():
    from labkit.widgets import head_explorer
    p = torch.rand(2, 3, 4, 4).softmax(-1)
    assert head_explorer(p, list("abcd"), live=False).values == {"layer": 0, "head": 0, "query": 3}
    assert head_explorer(tuple(p[i][None] for i in range(2)), list("abcd"), live=False).redraws == 1
    with pytest.raises(ValueError, match="3 tokens for patterns over 4 positions"):
        head_explorer(p, list("abc"), live=False)
    with pytest.raises(ValueError, match=r"\(layer, head, T, T\)"):
        head_explorer(p[0], list("abcd"), live=False)


def test_progress_is_silent_in_batch_runs_and_a_bar_when_live():
    from labkit.widgets import progress
    items = [1, 2, 3]
    assert progress(items, live=False) is items
    bar = progress(items, desc="x", live=True, disable=True)
    assert list(bar) == items and hasattr(bar, "update")
