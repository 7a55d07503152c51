"""QUESTIONS.md is generated from the notebooks' open-question cells and must be current."""
import json

from labkit.questions import MARKER, main, open_questions, render


def test_questions_md_is_current():
    assert main(["--check"]) == 0, "QUESTIONS.md is out of date: run `python -m labkit questions`"


def test_render_links_each_question_to_its_notebook_and_cell(tmp_path):
    nb = {"cells": [{"cell_type": "markdown", "id": "x1", "source": ["# Title"]},
                    {"cell_type": "markdown", "id": "q7", "source": [f"{MARKER} does it hold ", "at 1B?"]},
                    {"cell_type": "code", "id": "c", "source": [f"# {MARKER} in code is not a question"]}]}
    (tmp_path / "07_long.ipynb").write_text(json.dumps(nb))
    text = render(tmp_path)
    assert "## [07_long](notebooks/07_long.ipynb)" in text
    assert "- does it hold at 1B? *(cell 1, id `q7`)*" in text and text.count("\n- ") == 1
    assert open_questions({"cells": []}) == []
