"""What the exercise tests share: the text of a note's `## Exercises` section, so that a test can check
that the answer it computes from the code is the one the note's hint gives."""

import re
from pathlib import Path

import pytest

NOTES = Path(__file__).resolve().parents[2] / "notes"


def exercises_section(name: str) -> str:
    """The `## Exercises` section of notes/<name>.md, up to the next heading or the closing "Next:" line."""
    text = (NOTES / f"{name}.md").read_text()
    m = re.search(r"^## Exercises\n(.*?)(?=^## |^Next:|\Z)", text, flags=re.S | re.M)
    assert m, f"notes/{name}.md has no ## Exercises section"
    return " ".join(m.group(1).split())  # one line, so a hint may wrap anywhere


@pytest.fixture
def hints():
    """hints(note_name): the note's exercises as one line of text."""
    return exercises_section
