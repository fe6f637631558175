"""Specification of training/data.py: where the corpus comes from, how it is split, how token
ids are cached, and what batches look like."""

import hashlib
import io
import json
import os
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from training import data
from training.tokenizer import Tokenizer

REAL_DATA_DIR = os.environ.get(data.DATA_DIR_ENV)  # read before the fixture below clears it
FAKE_CORPUS = ("ROMEO:\nBut, soft! what light through yonder window breaks?\n\n" * 40).encode()


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    """A private cache, no data dir, and no network: a test that downloads by accident fails."""
    monkeypatch.setenv(data.CACHE_DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)

    def no_network(*args, **kwargs):
        raise AssertionError("this test must not touch the network")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)


@pytest.fixture
def fake_shakespeare(tmp_path, monkeypatch):
    """ZOO_DATA_DIR holding a small stand-in whose checksum is the one expected."""
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / data.TINYSHAKESPEARE_FILE).write_bytes(FAKE_CORPUS)
    monkeypatch.setattr(data, "TINYSHAKESPEARE_SHA256", hashlib.sha256(FAKE_CORPUS).hexdigest())
    monkeypatch.setenv(data.DATA_DIR_ENV, str(folder))
    return FAKE_CORPUS.decode()


def serve(monkeypatch, body: bytes) -> list:
    """Make urlopen answer `body`; returns the list of URLs requested."""
    requested = []

    def urlopen(url, timeout):
        requested.append(url)
        return io.BytesIO(body)

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    return requested


# ---------------------------------------------------------------------------- corpora


def test_cache_dir_follows_env_then_xdg_then_home(tmp_path, monkeypatch):
    assert data.cache_dir() == tmp_path / "cache"
    monkeypatch.delenv(data.CACHE_DIR_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.cache_dir() == tmp_path / "xdg" / "llm-zoo"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data.cache_dir() == tmp_path / "home" / ".cache" / "llm-zoo"


def test_tinyshakespeare_found_via_env_var(fake_shakespeare):
    assert data.load_corpus("tinyshakespeare") == fake_shakespeare


def test_real_tinyshakespeare_via_env_var(monkeypatch):
    if not REAL_DATA_DIR or not (Path(REAL_DATA_DIR) / data.TINYSHAKESPEARE_FILE).is_file():
        pytest.skip(f"set {data.DATA_DIR_ENV} to a folder holding {data.TINYSHAKESPEARE_FILE} (CI does)")
    monkeypatch.setenv(data.DATA_DIR_ENV, REAL_DATA_DIR)
    text = data.load_corpus()
    assert len(text) == 1_115_394 and text.startswith("First Citizen:\nBefore we proceed any further")


def test_checksum_mismatch_is_an_error(fake_shakespeare, monkeypatch):
    monkeypatch.setattr(data, "TINYSHAKESPEARE_SHA256", "0" * 64)
    path = Path(os.environ[data.DATA_DIR_ENV]) / data.TINYSHAKESPEARE_FILE
    with pytest.raises(ValueError, match=f"checksum mismatch: {path} .*found through .*ZOO_DATA_DIR"):
        data.load_corpus("tinyshakespeare")
    assert path.exists()  # the user's file: reported, never deleted


def test_data_dir_without_the_file_is_an_error(tmp_path, monkeypatch):
    """A ZOO_DATA_DIR that lacks the file must not fall back to another corpus behind the user's back."""
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(data, "embedded_corpus", lambda: pytest.fail("fell back to the embedded corpus"))
    with pytest.raises(FileNotFoundError, match=f"ZOO_DATA_DIR is .*{data.TINYSHAKESPEARE_FILE} does not exist"):
        data.load_corpus("tinyshakespeare")


def test_download_is_verified_then_cached(monkeypatch):
    monkeypatch.setattr(data, "TINYSHAKESPEARE_SHA256", hashlib.sha256(FAKE_CORPUS).hexdigest())
    requested = serve(monkeypatch, FAKE_CORPUS)
    assert data.load_corpus("tinyshakespeare") == FAKE_CORPUS.decode()
    assert data.load_corpus("tinyshakespeare") == FAKE_CORPUS.decode()
    assert requested == [data.TINYSHAKESPEARE_URL]  # the second call read the cache
    assert (data.cache_dir() / data.TINYSHAKESPEARE_FILE).read_bytes() == FAKE_CORPUS


def test_bad_download_is_an_error_and_saves_nothing(monkeypatch):
    serve(monkeypatch, b"<html>captive portal</html>")
    with pytest.raises(ValueError, match="checksum mismatch: the download from .*nothing was saved"):
        data.load_corpus("tinyshakespeare")
    assert not (data.cache_dir() / data.TINYSHAKESPEARE_FILE).exists()


def test_corrupt_cached_copy_is_deleted_with_an_error():
    cached = data.cache_dir() / data.TINYSHAKESPEARE_FILE
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"truncated")
    with pytest.raises(ValueError, match="checksum mismatch.*deleted; run again"):
        data.load_corpus("tinyshakespeare")
    assert not cached.exists()


def test_offline_download_falls_back_to_embedded_corpus(monkeypatch, capsys):
    def offline(url, timeout):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    text = data.load_corpus("tinyshakespeare")
    from pydoc_data.topics import topics

    assert text == data.embedded_corpus() and text.startswith(next(iter(topics.values())))
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "failed" in lines[0] and "falling back to the embedded corpus" in lines[0]


def test_corpus_says_what_it_is_where_it_came_from_and_its_fingerprint(fake_shakespeare, tmp_path, monkeypatch):
    real = data.get_corpus("tinyshakespeare")
    assert (real.name, real.is_fallback) == ("tinyshakespeare", False) and "ZOO_DATA_DIR" in real.origin
    assert real.sha256 == hashlib.sha256(FAKE_CORPUS).hexdigest()
    path = tmp_path / "poem.txt"
    path.write_text("Shall I compare thee")
    assert (data.get_corpus(str(path)).name, data.get_corpus(str(path)).origin) == (str(path), f"the file {path}")

    def offline(url, timeout):
        raise urllib.error.URLError("no route to host")

    monkeypatch.delenv(data.DATA_DIR_ENV)
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    fallback = data.get_corpus("tinyshakespeare")
    assert fallback.is_fallback and fallback.name == data.FALLBACK_NAME and "NOT Tiny Shakespeare" in fallback.name
    assert fallback.text == data.embedded_corpus() and fallback.sha256 != real.sha256


def test_txt_source_is_read_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "hub_dataset", lambda *a, **k: pytest.fail("a .txt file needs no `datasets`"))
    path = tmp_path / "poem.txt"
    path.write_bytes(b"Shall I compare thee\r\nto a summer's day?\n\nThou art more lovely")
    assert data.load_corpus(str(path)) == "Shall I compare thee\nto a summer's day?\n\nThou art more lovely"


# .json/.jsonl files are read by training/datafiles.py, without `datasets`.
def test_jsonl_source_uses_text_column(tmp_path):
    path = tmp_path / "stories.jsonl"
    path.write_text("".join(json.dumps({"id": i, "body": s}) + "\n" for i, s in enumerate(["Once.", "Twice."])))
    assert data.load_corpus(str(path), text_column="body") == "Once.\n\nTwice."


def test_missing_text_column_lists_columns(tmp_path):
    path = tmp_path / "stories.jsonl"
    path.write_text(json.dumps({"id": 0, "body": "Once."}) + "\n")
    with pytest.raises(ValueError, match=r"no column 'text'; its columns are \['id', 'body'\]"):
        data.load_corpus(str(path))


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="corpus file .*nope.txt does not exist"):
        data.load_corpus(str(tmp_path / "nope.txt"))


def test_validation_split_is_last_ten_percent():
    text = "".join(chr(ord("a") + i % 26) for i in range(1000))
    train, val = data.split_text(text)
    assert (train, val) == (text[:900], text[900:])
    # On Tiny Shakespeare's 1,115,394 characters the cut is nanoGPT's int(n * 0.9).
    assert len(data.split_text("x" * 1_115_394)[0]) == int(1_115_394 * 0.9) == 1_003_854
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        data.split_text(text, val_fraction=0)


# ---------------------------------------------------------------------------- tokens


def token_data(n: int) -> data.TokenData:
    """Token ids 0, 1, ..., n-1, so every window's values say where it was cut from."""
    ids = torch.arange(n, dtype=torch.int32).to(torch.uint16)
    return data.TokenData(train=ids, val=ids[: n // 10], train_chars=2 * n, val_chars=n // 5, vocab_size=n)


def test_batches_are_a_pure_function_of_the_generator():
    d = token_data(1000)
    first = d.get_batch("train", 8, 16, torch.Generator().manual_seed(7))
    torch.manual_seed(123)  # the global RNG and earlier draws elsewhere must not matter
    d.get_batch("train", 8, 16, torch.Generator().manual_seed(99))
    second = d.get_batch("train", 8, 16, torch.Generator().manual_seed(7))
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    other = d.get_batch("train", 8, 16, torch.Generator().manual_seed(8))
    assert not torch.equal(first[0], other[0])


def test_targets_are_inputs_shifted_by_one():
    x, y = token_data(1000).get_batch("train", 8, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y, x + 1)  # the ids are positions, so the next token is the next position


def test_smallest_split_yields_its_only_window():
    x, y = token_data(170).get_batch("val", 2, 16, torch.Generator())  # val holds 17 = 16 + 1 tokens
    assert torch.equal(x, torch.arange(16).expand(2, 16)) and torch.equal(y, x + 1)


def test_dataset_too_small_for_block_size_is_a_clear_error():
    with pytest.raises(ValueError, match=r"the val split has 10 tokens, but block_size=16 needs at least 17.*--block-size"):
        token_data(100).get_batch("val", 4, 16, torch.Generator())
    with pytest.raises(ValueError, match="split must be 'train' or 'val'"):
        token_data(100).get_batch("test", 4, 16, torch.Generator())


def test_val_chars_per_token_converts_loss_to_nats_per_char():
    d = token_data(1000)  # 100 val tokens from 200 val characters
    assert d.val_chars_per_token == 2.0  # a loss of 3 nats/token is 1.5 nats/char


def test_prepared_data_is_the_tokenized_split(fake_shakespeare):
    tok = Tokenizer.train(fake_shakespeare, vocab_size=300)
    d = data.prepare_data("tinyshakespeare", tok, val_fraction=0.2)
    train_text, val_text = data.split_text(fake_shakespeare, 0.2)
    assert d.train.tolist() == tok.encode(train_text) and d.val.tolist() == tok.encode(val_text)
    assert (d.train_chars, d.val_chars, d.vocab_size) == (len(train_text), len(val_text), 300)
    assert d.train.dtype == torch.uint16
    assert d.val_chars_per_token == len(val_text) / len(tok.encode(val_text))


def test_token_cache_is_reused(fake_shakespeare, tmp_path, monkeypatch):
    tok = Tokenizer.train(fake_shakespeare, kind="char")
    first = data.prepare_data("tinyshakespeare", tok, cache_dir=tmp_path / "tokens")
    [folder] = (tmp_path / "tokens").iterdir()
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "train.bin", "val.bin"]

    def no_encoding(*args, **kwargs):
        raise AssertionError("cached token ids must not be computed again")

    monkeypatch.setattr(tok, "encode", no_encoding)
    second = data.prepare_data("tinyshakespeare", tok, cache_dir=tmp_path / "tokens")
    assert torch.equal(first.train, second.train) and torch.equal(first.val, second.val)
    with pytest.raises(AssertionError):  # another split is another cache entry
        data.prepare_data("tinyshakespeare", tok, cache_dir=tmp_path / "tokens", val_fraction=0.2)


class LargeVocabTokenizer:
    """Stands in for a tokenizer of more than 65,536 tokens (Llama 3 has 128,256)."""

    vocab_size = 128_256

    def encode(self, text):
        return [128_000 + ord(c) % 256 for c in text]

    def to_json(self):
        return "large-vocab stand-in"


def test_ids_above_uint16_are_stored_as_uint32(fake_shakespeare):
    d = data.prepare_data("tinyshakespeare", LargeVocabTokenizer())
    assert d.train.dtype == torch.uint32
    assert d.train[:3].tolist() == LargeVocabTokenizer().encode(fake_shakespeare[:3])
    assert np.asarray(d.get_batch("train", 1, 4, torch.Generator())[0]).min() >= 128_000
