"""Specification of training/bpe.py: the from-scratch byte-level BPE learns the merges, the token ids
and the encodings of the `tokenizers` library configured as training/tokenizer.py configures it."""

import json
import os
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from tokenizers import pre_tokenizers

from training import data
from training.bpe import BYTE_TO_CHAR, pretokenize, to_symbols, train_bpe
from training.tokenizer import SPECIAL_TOKENS, Tokenizer

LIBRARY_PRETOKENIZER = pre_tokenizers.ByteLevel(add_prefix_space=False)
# Characters Python's Unicode database knows (a later Unicode version may make a letter of one it
# does not), surrogates excepted: they are not text.
KNOWN = st.characters(blacklist_categories=("Cs", "Cn"))


def library_merges(tokenizer: Tokenizer) -> list[tuple[str, str]]:
    merges = json.loads(tokenizer.to_json())["model"]["merges"]
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in merges]


def assert_same_as_library(text: str, vocab_size: int):
    library = Tokenizer.train(text, vocab_size)
    ours = train_bpe(text, vocab_size, SPECIAL_TOKENS)
    expected = library_merges(library)
    first = next((i for i, (a, b) in enumerate(zip(expected, ours.merges)) if a != b), None)
    assert first is None, f"merge {first} differs: library {expected[first]}, ours {ours.merges[first]}"
    assert ours.merges == expected
    assert ours.vocab == library.backend.get_vocab(with_added_tokens=True)
    return library, ours


def test_byte_symbols_are_the_librarys_alphabet():
    assert sorted(BYTE_TO_CHAR.values()) == sorted(pre_tokenizers.ByteLevel.alphabet())
    assert (BYTE_TO_CHAR[ord(" ")], BYTE_TO_CHAR[ord("\n")], BYTE_TO_CHAR[ord("A")]) == ("Ġ", "Ċ", "A")
    assert to_symbols("é") == "Ã©"  # two UTF-8 bytes, two symbols


@settings(max_examples=300, deadline=None)
@given(st.text(KNOWN, max_size=40) | st.text(st.sampled_from(" \n\t\x1c'sdlt1a.é"), max_size=20))
@example("Hello  world\n\nIt's  x'y don''t 12ab  \n end   ")
@example("\x1c \x1f  a")  # separators that str.isspace calls whitespace and the pattern's \s does not
def test_pretokenize_matches_the_library(text):
    pieces = pretokenize(text)
    assert "".join(pieces) == text
    assert [to_symbols(p) for p in pieces] == [p for p, _ in LIBRARY_PRETOKENIZER.pre_tokenize_str(text)]


def test_ties_go_to_the_pair_of_smaller_ids_not_the_first_seen():
    # (b, a) and (a, b) each occur twice; "a" has the smaller id, so (a, b) is merged first.
    _, ours = assert_same_as_library("ba\nba\nab\nab", 264)
    assert ours.merges[0] == ("a", "b")


def test_overlapping_pairs_merge_left_to_right():
    # "aaa" holds (a, a) twice, overlapping: merging gives "aa a", never "a aa", so (aa, a) is
    # counted next and (a, aa) never is, in the library as here.
    _, ours = assert_same_as_library("aaaa aaa aaaa aaa\naaa", 266)
    assert ours.merges[0] == ("a", "a") and ("a", "aa") not in ours.merges


@settings(max_examples=60, deadline=None)
@given(st.text(st.sampled_from("ab \n'"), max_size=80), st.integers(262, 300))
def test_small_texts_learn_the_librarys_merges(text, vocab_size):
    if not text:
        return
    library, ours = assert_same_as_library(text, vocab_size)
    assert ours.encode(text) == library.encode(text)


def tinyshakespeare_train_split() -> str:
    folder = os.environ.get(data.DATA_DIR_ENV)
    if not folder or not (Path(folder) / data.TINYSHAKESPEARE_FILE).is_file():
        pytest.skip(f"set {data.DATA_DIR_ENV} to a folder holding {data.TINYSHAKESPEARE_FILE} (CI does)")
    return data.split_text(data.load_corpus("tinyshakespeare"))


def test_tinyshakespeare_slice_same_merges_and_ids():
    """100,000 characters at the quick start's size, 512: the same 251 merges, the same ids."""
    train, val = tinyshakespeare_train_split()
    library, ours = assert_same_as_library(train[:100_000], 512)
    assert len(ours.merges) == 512 - len(SPECIAL_TOKENS) - 256
    text = val[:20_000] + "<|eos|> spelled out, NUL \x00, emoji 🦙, CJK 日本語, e\u0301"
    assert ours.encode(text) == library.encode(text)
    assert ours.decode(ours.encode(text)) == text


@pytest.mark.slow
@pytest.mark.parametrize("vocab_size", [512, 2048])
def test_tinyshakespeare_whole_train_split_same_merges_and_ids(vocab_size):
    """The tokenizers of the `tiny` and `shakespeare` presets, as training/cli.py trains them."""
    train, val = tinyshakespeare_train_split()
    library, ours = assert_same_as_library(train, vocab_size)
    assert ours.encode(val) == library.encode(val)


def test_pattern_whitespace_is_unicode_white_space():
    # U+3000 is White_Space but only U+0020 sticks to the next word; U+001C..U+001F are not
    # White_Space, though str.isspace says they are, so they run together as symbols.
    assert pretokenize("a\u3000\u3000b") == ["a", "\u3000", "\u3000", "b"]
    assert pretokenize("a  b") == ["a", " ", " b"]
    assert pretokenize("a\x1c\x1cb") == ["a", "\x1c\x1c", "b"]


def test_the_benchmark_checks_and_times_both_tokenizers():
    from training.benchmarks.bpe import measure
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 30
    row = measure(text, "Speak, speak. We proceed.\n", 300, repeats=1)
    assert row["merges"] == 300 - len(SPECIAL_TOKENS) - 256 and row["val_tokens"] > 0
    assert min(row["train_s_ours"], row["train_s_tokenizers"], row["encode_s_ours"], row["encode_s_tokenizers"]) >= 0
