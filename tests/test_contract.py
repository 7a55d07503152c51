"""The notebook contract (notebooks/README.md), checked on every committed notebook.

Every notebook: a parameters cell, Code / Plot / Break / Learn headings, Predict cells, an assert
after Learn, committed outputs with an image, a figure under figures/<stem>/ (the rules of
../shared/tools/nbcontract.py).

Learn by doing (issue 15), for the notebooks in LEARN_BY_DOING: ≥ 2 exercises, each an
``ex.check("<id>", fn)`` cell marked ✏️ EXERCISE and committed with the ``ex.reference("<id>")``
stand-in and a passing ✓; every exercise labkit registers for the notebook is used; no
``progress=False``; no bertviz (its views load JavaScript from a CDN: blank offline); every
Predict cell gets a printed verdict later on; the last notebook of each part ends with a
self-check. The rule functions are tested on small synthetic notebooks at the end (they must
fail where they should).
"""
from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

from labkit import exercises as ex

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))

# Every notebook follows the learn-by-doing rules (a new notebook is checked from its first commit).
LEARN_BY_DOING = [p.stem for p in NOTEBOOKS]

CHECK_CALL = re.compile(r"""\bex\.check\(\s*["']([^"']+)["']""")
VERDICT = re.compile(r"prediction (held|missed|did not hold)", re.IGNORECASE)
PREDICT = re.compile(r"^\s*\*\*Predict", re.MULTILINE)


def part_of(stem: str) -> str:
    """'03_attention_basics' -> 'core'; 'B1_attention_patterns' -> 'B'."""
    return "core" if stem[0].isdigit() else stem[0]


def last_of_each_part(stems: list[str]) -> set[str]:
    """The notebook that ends each part: the highest number of the core, of track A, B, ..."""
    last: dict[str, tuple[int, str]] = {}
    for stem in stems:
        number = int(re.match(r"[A-Z]?(\d+)", stem).group(1))
        last[part_of(stem)] = max(last.get(part_of(stem), (-1, "")), (number, stem))
    return {stem for _, stem in last.values()}


def code(nb) -> list:
    return [c for c in nb.cells if c.cell_type == "code"]


def output_text(cell) -> str:
    parts = []
    for o in cell.get("outputs", []):
        if o.get("output_type") == "stream":
            parts.append(o.get("text", ""))
        else:
            data = o.get("data", {})
            parts += [data.get("text/plain", ""), data.get("text/markdown", "")]
    return "".join(p if isinstance(p, str) else "".join(p) for p in parts)


def base_problems(nb, stem: str, figures: Path) -> list[str]:
    """The contract every notebook meets (ported from ../shared/tools/nbcontract.py)."""
    out = []
    cells = nb.cells
    if not any("parameters" in c.metadata.get("tags", []) for c in cells):
        out.append("no cell tagged 'parameters'")
    heads = [line.lower() for c in cells if c.cell_type == "markdown"
             for line in c.source.splitlines() if line.startswith("#")]
    for section in ("code", "plot", "break", "learn"):
        if not any(re.search(rf"\b{section}\b", h) for h in heads):
            out.append(f"no '{section.title()}' heading")
    if not any("predict" in c.source.lower() for c in cells if c.cell_type == "markdown"):
        out.append("no 'Predict' markdown cell")
    learn_at = next((i for i, c in enumerate(cells) if c.cell_type == "markdown" and
                     re.search(r"^#+\s*(\d+\s*[.·]?\s*)?learn\b", c.source.lower(), re.M)), None)
    if learn_at is None or not any("assert " in c.source for c in cells[learn_at:] if c.cell_type == "code"):
        out.append("no assert after the Learn heading")
    outputs = [o for c in code(nb) for o in c.get("outputs", [])]
    if not outputs:
        out.append("committed without outputs")
    elif not any("image/png" in o.get("data", {}) for o in outputs):
        out.append("no image among its outputs")
    if not any((figures / stem).glob("*.png")):
        out.append(f"no PNG under figures/{stem}/")
    return out


def learn_by_doing_problems(nb, stem: str, ends_a_part: bool) -> list[str]:
    """The learn-by-doing rules (issue 15) for a converted notebook."""
    out = []
    prefix = stem.split("_")[0]
    registered = {i for i in ex.registry() if i.split(".")[0] == prefix}
    checked = {}
    for c in code(nb):
        for id in CHECK_CALL.findall(c.source):
            checked[id] = c
    if len(checked) < 2:
        out.append(f"{len(checked)} exercise(s) with an ex.check(...) cell; at least 2 are required")
    for id, c in checked.items():
        if id not in ex.registry():
            out.append(f"ex.check({id!r}): no such exercise in labkit/exercises/")
        elif id.split(".")[0] != prefix:
            out.append(f"ex.check({id!r}) belongs to notebook {id.split('.')[0]}, not {prefix}")
        if "✏️ EXERCISE" not in c.source:
            out.append(f"the cell checking {id!r} lacks the '# ✏️ EXERCISE' marker comment")
        if f'ex.reference("{id}")' not in c.source:
            out.append(f'the cell checking {id!r} must be committed with the ex.reference("{id}") stand-in')
        if f"✓ {id}" not in output_text(c):
            out.append(f"the committed output of ex.check({id!r}) is not a ✓ (run the notebook before committing)")
    for id in sorted(registered - set(checked)):
        out.append(f"exercise {id!r} is registered in labkit but no cell checks it")
    for c in code(nb):
        if re.search(r"\bprogress\s*=\s*False", c.source):
            out.append(f"progress=False in a code cell ({c.source.strip().splitlines()[0][:60]!r}): "
                       f"long loops show progress in JupyterLab (silent in batch runs anyway)")
        if re.search(r"^\s*(from|import) bertviz", c.source, re.M):
            out.append("uses bertviz, whose views load JavaScript from a CDN (blank offline): "
                       "use labkit.widgets.head_explorer")
    # Predict k needs a verdict after it; verdicts may come later (e.g. in Learn), one per Predict.
    predicts = [i for i, c in enumerate(nb.cells) if c.cell_type == "markdown" and PREDICT.search(c.source)]
    verdicts = [(i, len(VERDICT.findall(output_text(c)))) for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    for k, at in enumerate(predicts):
        after = sum(n for i, n in verdicts if i > at)
        if after < len(predicts) - k:
            first_line = nb.cells[at].source.strip().splitlines()[0]
            out.append(f"Predict cell {k + 1} of {len(predicts)} ({first_line[:50]!r}) has no printed verdict "
                       f"after it: print labkit.verdict(held) (✓ prediction held / ✗ prediction missed)")
            break
    if ends_a_part:
        quiz = [c for c in code(nb) if "SelfCheck(" in c.source or ".check(answers" in c.source]
        if not quiz or not any(re.search(r"Self-check.*\d+/\d+ right ✓", output_text(c)) for c in code(nb)):
            out.append("ends a part but has no self-check (ex.SelfCheck, committed with every answer right)")
    return out


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_notebook_meets_the_contract(path):
    problems = base_problems(nbformat.read(path, as_version=4), path.stem, ROOT / "figures")
    assert not problems, f"{path.name} breaks the notebook contract: " + "; ".join(problems)


@pytest.mark.parametrize("stem", LEARN_BY_DOING)
def test_converted_notebooks_meet_the_learn_by_doing_rules(stem):
    path = ROOT / "notebooks" / f"{stem}.ipynb"
    ends = stem in last_of_each_part([p.stem for p in NOTEBOOKS])
    problems = learn_by_doing_problems(nbformat.read(path, as_version=4), stem, ends)
    assert not problems, f"{path.name} breaks the learn-by-doing rules:\n- " + "\n- ".join(problems)


def test_the_parts_end_where_the_readme_says():
    ends = last_of_each_part([p.stem for p in NOTEBOOKS])
    assert {part_of(s) for s in ends} == {part_of(p.stem) for p in NOTEBOOKS}
    assert last_of_each_part(["03_a", "16_b", "B1_c", "A1_d", "A5_e", "A2_f"]) == {"16_b", "B1_c", "A5_e"}


# --- the rules fail where they should (negative controls on synthetic notebooks) ----------------

def notebook(*cells):
    """cells: ("md", source) or ("code", source, printed output)."""
    nb = nbformat.v4.new_notebook()
    for kind, source, *printed in cells:
        if kind == "md":
            nb.cells.append(nbformat.v4.new_markdown_cell(source))
        else:
            c = nbformat.v4.new_code_cell(source)
            c.outputs = [nbformat.v4.new_output("stream", name="stdout", text=printed[0])] if printed else []
            nb.cells.append(c)
    return nb


EXERCISE_CELLS = [("code", f'# ✏️ EXERCISE 03.{n}\ndef f(T):\n    return ex.reference("{i}")(T)\nex.check("{i}", f)', f"✓ {i} — ...")
                  for n, i in enumerate(sorted(i for i in ex.registry() if i.startswith("03.")), 1)]


def test_a_compliant_synthetic_notebook_passes():
    nb = notebook(*EXERCISE_CELLS, ("md", "**Predict.** x > 1"), ("code", "print(x)", "x = 2 (✓ prediction held)"))
    assert learn_by_doing_problems(nb, "03_attention_basics", ends_a_part=False) == []


@pytest.mark.parametrize("broken,expected", [
    (lambda cells: cells[:1], "at least 2 are required"),
    (lambda cells: [(k, s.replace("✏️ EXERCISE", "exercise"), o) for k, s, o in cells], "marker"),
    (lambda cells: [(k, re.sub(r'return ex\.reference\("[^"]+"\)\(T\)', "return T", s), o) for k, s, o in cells],
     "stand-in"),
    (lambda cells: [(k, s, o.replace("✓", "✗")) for k, s, o in cells], "is not a ✓"),
    (lambda cells: cells + [("code", 'ex.check("03.nope", f)  # ✏️ EXERCISE ex.reference("03.nope")', "✓ 03.nope")],
     "no such exercise"),
    (lambda cells: cells + [("code", "train(m, d, cfg, progress=False)", "")], "progress=False"),
    (lambda cells: cells + [("code", "from bertviz import head_view", "")], "bertviz"),
    (lambda cells: cells + [("md", "**Predict.** y < 1"), ("code", "print(y)", "y = 0")], "no printed verdict"),
])
def test_each_learn_by_doing_rule_catches_its_violation(broken, expected):
    problems = learn_by_doing_problems(notebook(*broken(EXERCISE_CELLS)), "03_attention_basics", ends_a_part=False)
    assert any(expected in p for p in problems), f"expected a problem mentioning {expected!r}, got {problems}"


def test_an_unused_registered_exercise_is_reported():
    problems = learn_by_doing_problems(notebook(*EXERCISE_CELLS[:2]), "03_attention_basics", ends_a_part=False)
    assert len(EXERCISE_CELLS) < 3 or any("no cell checks it" in p for p in problems)


def test_verdicts_are_matched_one_per_predict():
    two_predicts_one_verdict = notebook(*EXERCISE_CELLS, ("md", "**Predict.** a"), ("md", "**Predict.** b"),
                                        ("code", "print(v)", "✓ prediction held"))
    assert any("Predict cell 1 of 2" in p for p in learn_by_doing_problems(two_predicts_one_verdict, "03_x", False))
    verdict_before_its_predict = notebook(*EXERCISE_CELLS, ("code", "print(v)", "✓ prediction held"),
                                          ("md", "**Predict.** a"))
    assert any("no printed verdict" in p for p in learn_by_doing_problems(verdict_before_its_predict, "03_x", False))


def test_the_last_notebook_of_a_part_needs_a_self_check():
    nb = notebook(*EXERCISE_CELLS)
    assert any("self-check" in p for p in learn_by_doing_problems(nb, "03_x", ends_a_part=True))
    nb = notebook(*EXERCISE_CELLS, ("code", 'quiz = ex.SelfCheck("03", "Self-check: x")\nquiz.check(answers)',
                                    "Self-check: x: 3/3 right ✓"))
    assert learn_by_doing_problems(nb, "03_x", ends_a_part=True) == []


def test_the_base_rules_catch_a_bare_notebook(tmp_path):
    problems = base_problems(notebook(("md", "# Title"), ("code", "x = 1")), "99_bare", tmp_path)
    for expected in ("parameters", "'Code' heading", "'Learn' heading", "Predict", "assert after the Learn",
                     "without outputs", "no PNG under figures/99_bare/"):
        assert any(expected in p for p in problems), f"{expected!r} not reported: {problems}"
