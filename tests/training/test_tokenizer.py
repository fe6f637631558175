"""Specification of training/tokenizer.py: exact round trips, fixed special ids, determinism,
save/load, Hugging Face files, and errors that name what is wrong."""

import json
import os
from pathlib import Path

import pytest
import tokenizers
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from training import data
from training.tokenizer import MIN_BPE_VOCAB, SPECIAL_TOKENS, Tokenizer, get_tokenizer

TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die than to famish?\n"
) * 20


@pytest.fixture(scope="module")
def bpe():
    return Tokenizer.train(TEXT, vocab_size=300)


@pytest.fixture(scope="module")
def char():
    return Tokenizer.train(TEXT, kind="char")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(data.CACHE_DIR_ENV, str(tmp_path / "cache"))


def test_special_tokens_have_fixed_ids(bpe, char):
    for tok in (bpe, char):
        assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
        assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)


@settings(max_examples=300, deadline=None)
@given(st.text())
@example("")
@example("<|eos|> spelled out, and <|user|> too")
@example("tabs\tand\r\nwindows newlines, NUL \x00, emoji 🦙, CJK 日本語, combining e\u0301")
def test_bpe_round_trip_is_exact(bpe, text):
    # Byte-level: the 256 byte tokens cover every UTF-8 string, whatever the training text was.
    assert bpe.decode(bpe.encode(text)) == text


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=sorted(set(TEXT))))
def test_char_round_trip_is_exact_over_the_training_alphabet(char, text):
    ids = char.encode(text)
    assert len(ids) == len(text)  # one token per character
    assert char.decode(ids) == text


def test_char_vocabulary_is_specials_then_sorted_characters(char):
    alphabet = sorted(set(TEXT))
    assert char.kind == "char"
    assert char.vocab_size == len(SPECIAL_TOKENS) + len(alphabet)
    assert [char.decode([i]) for i in range(5, char.vocab_size)] == alphabet


def test_char_tokenizer_rejects_unseen_character(char):
    with pytest.raises(ValueError, match=r"character 'é' \(U\+00E9\) at index 5"):
        char.encode("Speakéz")


def test_char_tokenizer_matches_special_tokens_whole(char):
    # '<' and '|' are not in the training text, yet a spelled-out special token is one token.
    assert char.encode("All<|eos|>") == char.encode("All") + [char.eos_id]


def test_encode_adds_bos_and_eos_only_when_asked(bpe):
    plain = bpe.encode("hear me speak")
    assert bpe.bos_id not in plain and bpe.eos_id not in plain
    assert bpe.encode("hear me speak", bos=True, eos=True) == [bpe.bos_id] + plain + [bpe.eos_id]


def test_bpe_reaches_the_requested_vocab_size():
    # The embedded corpus (465 k chars) has far more than 1024 - 261 mergeable pairs.
    assert Tokenizer.train(data.embedded_corpus(), vocab_size=1024).vocab_size == 1024


def test_training_is_deterministic(tmp_path):
    first = Tokenizer.train(TEXT, vocab_size=300).save(tmp_path / "a.json")
    second = Tokenizer.train(TEXT, vocab_size=300).save(tmp_path / "b.json")
    assert first.read_bytes() == second.read_bytes()


def test_rejects_unknown_kind_and_too_small_vocab():
    with pytest.raises(ValueError, match="unknown tokenizer kind 'wordpiece'"):
        Tokenizer.train(TEXT, kind="wordpiece")
    with pytest.raises(ValueError, match=f"vocab_size=260 is too small.*>= {MIN_BPE_VOCAB}"):
        Tokenizer.train(TEXT, vocab_size=260)
    with pytest.raises(ValueError, match="empty text"):
        Tokenizer.train("")


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_saved_tokenizer_loads_identically(tmp_path, kind):
    tok = Tokenizer.train(TEXT, vocab_size=300, kind=kind)
    path = tok.save(tmp_path)  # a folder: the file is tokenizer.json inside it
    assert path == tmp_path / "tokenizer.json"
    loaded = Tokenizer.from_file(path)
    assert loaded.to_json() == tok.to_json()
    assert (loaded.kind, loaded.vocab_size) == (kind, tok.vocab_size)
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert loaded.encode(TEXT) == tok.encode(TEXT)


def test_special_token_names_given_to_the_constructor_survive_save_and_load(tmp_path, bpe):
    custom = Tokenizer(bpe.backend, eos_token="<|assistant|>", pad_token="<|eos|>")
    loaded = Tokenizer.from_file(custom.save(tmp_path / "tokenizer.json"))
    assert (loaded.eos_token, loaded.eos_id, loaded.pad_id) == ("<|assistant|>", 4, 1)
    assert loaded.bos_token == "<|bos|>"


def make_llama_style_file(folder: Path) -> Path:
    """A tiny tokenizer.json shaped like Llama 3's: byte-level BPE with its specials after the
    ordinary vocabulary and a post-processor that prepends <|begin_of_text|>."""
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=280, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    backend.train_from_iterator([TEXT], trainer)
    backend.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"])
    bos = backend.token_to_id("<|begin_of_text|>")
    backend.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)])
    path = folder / "tokenizer.json"
    backend.save(str(path))
    return path


def test_loads_hugging_face_tokenizer_json(tmp_path):
    path = make_llama_style_file(tmp_path)
    tok = Tokenizer.from_file(tmp_path)  # the folder, as in a model directory
    assert tok.kind == "pretrained"
    assert tok.vocab_size == 283
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (280, 281, None)
    assert tok.bos_token == "<|begin_of_text|>" and tok.eos_token == "<|end_of_text|>"
    # The file's post-processor would prepend <|begin_of_text|>; ours adds it only on request.
    reference = tokenizers.Tokenizer.from_file(str(path))
    assert reference.encode("hear me").ids == [280] + tok.encode("hear me")
    assert tok.encode("hear me", bos=True) == reference.encode("hear me").ids
    assert tok.decode(tok.encode("Speak, speak! ¿Qué?")) == "Speak, speak! ¿Qué?"


def test_tokenizer_config_beside_the_file_names_the_special_tokens(tmp_path):
    make_llama_style_file(tmp_path)
    # Hugging Face writes names as strings or as {"content": ...}; Llama 3 Instruct ends turns with <|eot_id|>.
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|eot_id|>"}}))
    tok = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert (tok.eos_token, tok.eos_id, tok.bos_id) == ("<|eot_id|>", 282, 280)


def test_missing_or_broken_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no tokenizer file at {tmp_path / 'tokenizer.json'}.*get_tokenizer"):
        Tokenizer.from_file(tmp_path)
    pointer = tmp_path / "lfs.json"
    pointer.write_text("version https://git-lfs.github.com/spec/v1\n")
    with pytest.raises(ValueError, match=f"{pointer} is not valid JSON.*Git LFS"):
        Tokenizer.from_file(pointer)
    not_a_tokenizer = tmp_path / "other.json"
    not_a_tokenizer.write_text('{"hello": 1}')
    with pytest.raises(ValueError, match="JSON but not a tokenizer"):
        Tokenizer.from_file(not_a_tokenizer)


def test_decode_rejects_out_of_range_id(bpe):
    with pytest.raises(ValueError, match=r"token id 300 is outside the vocabulary \(vocab_size=300"):
        bpe.decode([5, 300])
    with pytest.raises(ValueError, match="token id -1"):
        bpe.decode([-1])


def test_decode_accepts_a_1d_tensor_only(bpe):
    ids = bpe.encode("hear me speak")
    assert bpe.decode(torch.tensor(ids)) == bpe.decode(ids) == "hear me speak"
    with pytest.raises(ValueError, match=r"1-D.*shape \(1, \d+\)"):
        bpe.decode(torch.tensor([ids]))


def test_get_tokenizer_trains_once_then_loads_from_cache(tmp_path, monkeypatch):
    first = get_tokenizer(TEXT, kind="bpe", vocab_size=300)
    [cached] = (tmp_path / "cache" / "tokenizers").glob("bpe300-*/tokenizer.json")  # under $ZOO_CACHE_DIR

    def no_training(*args, **kwargs):
        raise AssertionError("a cached tokenizer must not be trained again")

    monkeypatch.setattr(Tokenizer, "train", no_training)
    again = get_tokenizer(TEXT, kind="bpe", vocab_size=300)
    assert again.to_json() == first.to_json() == cached.read_text()
    with pytest.raises(AssertionError):  # another text, kind or size is another tokenizer
        get_tokenizer(TEXT, kind="bpe", vocab_size=301)


@pytest.mark.slow
def test_tinyshakespeare_round_trips_through_bpe():
    """The real corpus, when ZOO_DATA_DIR provides it (CI does): train, encode, decode."""
    folder = os.environ.get(data.DATA_DIR_ENV)
    if not folder or not (Path(folder) / data.TINYSHAKESPEARE_FILE).is_file():
        pytest.skip(f"set {data.DATA_DIR_ENV} to a folder holding {data.TINYSHAKESPEARE_FILE} (CI does)")
    text = data.load_corpus("tinyshakespeare")
    tok = Tokenizer.train(text, vocab_size=1024)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert 2.0 < len(text) / len(ids) < 3.0  # BPE-1024 packs a few characters into each token
