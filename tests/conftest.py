"""Fixtures shared by the tests of every folder."""

import json

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


@pytest.fixture
def edit_config():
    """edit_config(checkpoint_dir, **fields): overwrite fields of a checkpoint's config.json in place,
    to build a config that disagrees with the weights beside it."""
    def edit(directory, **fields):
        path = directory / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))
    return edit
