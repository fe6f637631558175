"""Fixtures shared by the tests of every folder."""

import pytest

# A small corpus with a repeating structure: a few training steps on it are enough to exercise
# the command lines end to end.
SMALL_CORPUS = "".join(f"Line {i}: to be, or not to be, that is the question.\n" for i in range(400))


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    """SMALL_CORPUS as a text file, with the zoo's caches redirected into tmp_path."""
    monkeypatch.setenv("ZOO_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "corpus.txt"
    path.write_text(SMALL_CORPUS)
    return path
