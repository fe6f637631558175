"""The answer to the characters-per-token exercise of notes/tokenizer.md, from the quick start's output
that notes/llama3.md prints."""

from pathlib import Path

NOTES = Path(__file__).resolve().parents[2] / "notes"


def test_characters_per_token_of_the_quick_start(hints):
    assert "2.9139 nats/token = 1.5570 nats/char" in (NOTES / "llama3.md").read_text()
    # nats/char = nats/token x tokens/char, so characters per token = (nats/token) / (nats/char)
    assert f"{2.9139 / 1.5570:.3f}" == "1.871"
    assert "2.9139 / 1.5570 = 1.871 characters per token" in hints("tokenizer")


def test_one_merge_of_four_equal_bytes(hints):
    from training.bpe import train_bpe

    word = "aaaa"
    pairs = list(zip(word, word[1:]))
    assert pairs == [("a", "a")] * 3  # three pairs, all (a, a), overlapping
    bpe = train_bpe(word, 257)  # the 256 bytes and one merge
    assert bpe.merges == [("a", "a")]
    assert bpe._merge_word(word) == ["aa", "aa"]  # left to right: the middle pair is used up
    assert "three (a, a) pairs" in hints("tokenizer") and 'becomes "aa aa", not "a aa a"' in hints("tokenizer")
