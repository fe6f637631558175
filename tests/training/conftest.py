"""Fixtures of the training tests."""

import urllib.error
import urllib.request

import pytest

from training import data


@pytest.fixture
def offline(monkeypatch):
    """No ZOO_DATA_DIR and no network: Tiny Shakespeare falls back to pydoc's topics (with the
    `corpus` fixture, which points the cache, where a download would be, at an empty folder)."""
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)

    def no_network(url, timeout):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
