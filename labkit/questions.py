"""The questions log: every open question the notebooks raise, in one file that links back.

A notebook records what it could not show at this scale, and what would show it, in a markdown
cell that starts with ``**Open question:**``. ``python -m labkit questions`` collects them, in
notebook order, into ``QUESTIONS.md`` at the repository root, each with a link to its notebook
and the cell's number and id; the tests fail when QUESTIONS.md is out of date.

    >>> cell = {"cell_type": "markdown", "id": "a1b2", "source": "**Open question:** does X hold at 1B?"}
    >>> open_questions({"cells": [{"cell_type": "code", "source": "x = 1"}, cell]})
    [(1, 'a1b2', 'does X hold at 1B?')]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

MARKER = "**Open question:**"
HEADER = """# Open questions

What the notebooks could not show at this scale, and what would show it. Each question lives in
its notebook, in a markdown cell that starts with `{marker}`; this file is generated from them
(`python -m labkit questions`) and the tests fail when it is out of date.
"""


def open_questions(nb: dict) -> list[tuple[int, str, str]]:
    """``[(cell number, cell id, question text)]`` of one notebook (its JSON as a dict)."""
    found = []
    for i, cell in enumerate(nb.get("cells", [])):
        text = "".join(cell.get("source", "")).strip()
        if cell.get("cell_type") == "markdown" and text.startswith(MARKER):
            found.append((i, cell.get("id", ""), " ".join(text[len(MARKER):].split())))
    return found


def render(notebooks_dir: Path) -> str:
    """QUESTIONS.md's text for every notebook in ``notebooks_dir``."""
    lines = [HEADER.format(marker=MARKER)]
    for path in sorted(Path(notebooks_dir).glob("*.ipynb")):
        questions = open_questions(json.loads(path.read_text(encoding="utf-8")))
        if not questions:
            continue
        lines.append(f"\n## [{path.stem}](notebooks/{path.name})\n")
        lines += [f"- {text} *(cell {i}, id `{cell_id}`)*" for i, cell_id, text in questions]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m labkit questions [--check]``: write QUESTIONS.md (or only check it is current)."""
    from .runtime import repo_root
    argv = sys.argv[1:] if argv is None else argv
    root = repo_root()
    text, target = render(root / "notebooks"), root / "QUESTIONS.md"
    if "--check" in argv:
        current = target.read_text(encoding="utf-8") if target.exists() else ""
        if current != text:
            print("QUESTIONS.md is out of date: run `python -m labkit questions`", file=sys.stderr)
            return 1
        return 0
    target.write_text(text, encoding="utf-8")
    print(f"{target}: {text.count(chr(10) + '- ')} questions")
    return 0
