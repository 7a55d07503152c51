"""The end-of-part self-check.

A self-check asks questions whose answers are THIS run's measurements, passed in by the
notebook; a wrong answer gets the explanation (also written from the measurements)::

    quiz = ex.SelfCheck("03", "Self-check: attention basics")
    quiz.numeric("std64", "Raw q·k score std for a 64-wide head, unit-variance q and k?",
                 answer=std64, tol=1.0, explain=f"var(q·k) = d: this run measured std {std64:.2f} ≈ √64")
    quiz.choice("mha", "Your True=may-attend mask passed to nn.MultiheadAttention ...",
                options=["works", "reads the future", "raises"], answer="reads the future",
                explain="nn.MultiheadAttention reads True as *blocked* ...")
    quiz.show()                                    # prints the questions
    answers = {"std64": quiz.answer("std64"),      # ← replace with your answer
               "mha": quiz.answer("mha")}          # ← a, b or c
    quiz.check(answers)                            # or: quiz.widget()

The committed notebook fills in ``quiz.answer(key)`` (the measured answer), so the suite stays
green; a learner replaces them, or answers in ``quiz.widget()``.
"""
from __future__ import annotations

import math
import string
from dataclasses import dataclass, field


@dataclass
class Question:
    """One question: ``kind`` "numeric" (``answer`` a number, right within ``tol`` absolute or
    ``rel`` relative) or "choice" (``answer`` one of ``options``, given as text or its letter)."""
    key: str
    text: str
    kind: str
    answer: object
    explain: str
    tol: float | None = None
    rel: float | None = None
    unit: str = ""
    options: list[str] = field(default_factory=list)

    def letter(self, option: str) -> str:
        return string.ascii_lowercase[self.options.index(option)]

    def expected(self):
        """The answer as a learner writes it: the number, or the option's letter."""
        return self.letter(self.answer) if self.kind == "choice" else self.answer

    def accepted(self) -> str:
        if self.kind == "choice":
            return f"{self.letter(self.answer)}) {self.answer}"
        margin = self.tol if self.tol is not None else self.rel * abs(self.answer)
        return f"{self.answer:.4g}{self.unit} ± {margin:.2g}"

    def grade(self, given) -> tuple[bool | None, str]:
        """(right, what the learner gave, normalised); right is None when unanswered."""
        if given is None or (isinstance(given, str) and not given.strip()):
            return None, "no answer"
        if self.kind == "numeric":
            try:
                value = float(given)
            except (TypeError, ValueError):
                return False, f"{given!r} (not a number)"
            margin = self.tol if self.tol is not None else self.rel * abs(self.answer)
            return abs(value - self.answer) <= margin and not math.isnan(value), f"{value:.4g}{self.unit}"
        text = str(given).strip()
        if len(text) == 1 and text.lower() in string.ascii_lowercase[:len(self.options)]:
            text = self.options[string.ascii_lowercase.index(text.lower())]
        if text not in self.options:
            return False, f"{given!r} (not one of the options: answer a, b, ... or the option's text)"
        return text == self.answer, f"{self.letter(text)}) {text}"


class SelfCheck:
    """A short self-assessment at the end of a part (see the module docstring)."""

    def __init__(self, part: str, title: str):
        self.part, self.title = part, title
        self.questions: dict[str, Question] = {}

    def _add(self, q: Question) -> None:
        if q.key in self.questions:
            raise ValueError(f"self-check {self.part}: question {q.key!r} is defined twice")
        self.questions[q.key] = q

    def numeric(self, key: str, text: str, answer: float, *, explain: str, tol: float | None = None,
                rel: float | None = None, unit: str = "") -> None:
        """A question answered by a number: right within ``tol`` (absolute) or ``rel`` (relative)."""
        if (tol is None) == (rel is None):
            raise ValueError(f"question {key!r}: give exactly one of tol= (absolute) or rel= (relative)")
        answer = float(answer)
        if not math.isfinite(answer):
            raise ValueError(f"question {key!r}: the measured answer is {answer}; a self-check needs a number")
        self._add(Question(key, text, "numeric", answer, explain, tol=tol, rel=rel, unit=unit))

    def choice(self, key: str, text: str, options: list[str], answer: str, *, explain: str) -> None:
        """A multiple-choice question; ``answer`` is the option the measurement picked."""
        if answer not in options:
            raise ValueError(f"question {key!r}: answer {answer!r} is not one of the options {options}")
        if len(set(options)) != len(options) or len(options) < 2:
            raise ValueError(f"question {key!r}: needs at least two distinct options, got {options}")
        self._add(Question(key, text, "choice", answer, explain, options=list(options)))

    def answer(self, key: str):
        """The measured answer to ``key``, as a learner would write it (committed notebooks use it)."""
        if key not in self.questions:
            raise KeyError(f"self-check {self.part} has no question {key!r}; it has {list(self.questions)}")
        return self.questions[key].expected()

    def show(self) -> None:
        """Print the questions (a learner reads them before answering)."""
        print(f"{self.title} — {len(self.questions)} questions; answer from what this notebook measured.")
        for i, q in enumerate(self.questions.values(), 1):
            print(f"{i}. [{q.key}] {q.text}" + (f" ({q.unit.strip()})" if q.unit.strip() else ""))
            for j, opt in enumerate(q.options):
                print(f"     {string.ascii_lowercase[j]}) {opt}")

    def grade(self, answers: dict) -> list[tuple[Question, bool | None, str]]:
        unknown = sorted(set(answers) - set(self.questions))
        if unknown:
            raise KeyError(f"self-check {self.part}: no question(s) {unknown}; the keys are {list(self.questions)}")
        return [(q, *q.grade(answers.get(q.key))) for q in self.questions.values()]

    def report(self, answers: dict) -> tuple[int, str]:
        """(number right, the text ``check`` prints)."""
        graded = self.grade(answers)
        right = sum(ok is True for _, ok, _ in graded)
        lines = [f"{self.title}: {right}/{len(graded)} right" + (" ✓" if right == len(graded) else "")]
        for q, ok, given in graded:
            if ok:
                lines.append(f"  ✓ {q.key}: {given}" + (f" (this run: {q.accepted()})" if q.kind == "numeric" else ""))
            elif ok is None:
                lines.append(f"  – {q.key}: not answered yet")
            else:
                lines.append(f"  ✗ {q.key}: you said {given}; this run: {q.accepted()}.\n      Why: {q.explain}")
        return right, "\n".join(lines)

    def check(self, answers: dict, *, raise_on_fail: bool | None = None) -> None:
        """Print right/wrong per question, with the explanation on a wrong one. In batch runs a
        wrong or missing answer raises (the committed notebook fills in the measured ones)."""
        from ..plotting import in_batch_run
        right, text = self.report(answers)
        print(text)
        if right < len(self.questions) and (in_batch_run() if raise_on_fail is None else raise_on_fail):
            from ._core import ExerciseFailed
            raise ExerciseFailed(text)

    def widget(self, live: bool | None = None) -> None:
        """Answer in JupyterLab: a box per question and a "Check my answers" button (nothing in batch runs)."""
        from ..plotting import in_batch_run
        if not ((not in_batch_run()) if live is None else live):
            return None
        import ipywidgets as widgets
        from IPython.display import display
        controls, rows = {}, []
        for i, q in enumerate(self.questions.values(), 1):
            label = widgets.HTML(f"<b>{i}.</b> {q.text}")
            if q.kind == "numeric":
                controls[q.key] = widgets.Text(placeholder=f"a number{' in ' + q.unit.strip() if q.unit.strip() else ''}",
                                               description=q.key)
            else:
                controls[q.key] = widgets.RadioButtons(options=[(f"{q.letter(o)}) {o}", q.letter(o)) for o in q.options],
                                                       value=None, description=q.key)
            rows += [label, controls[q.key]]
        button, out = widgets.Button(description="Check my answers", button_style="primary"), widgets.Output()

        def on_click(_):
            out.clear_output()
            with out:
                print(self.report({k: c.value for k, c in controls.items()})[1])

        button.on_click(on_click)
        self.widget_box = widgets.VBox(rows + [button, out])   # kept for tests; returning it would display it twice
        display(self.widget_box)
