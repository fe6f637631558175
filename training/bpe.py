"""Byte-level BPE from scratch: the trainer and encoder behind training/tokenizer.py, in Python.

Read beside notes/tokenizer.md. `train_bpe` learns the same merges, in the same order, with the
same token ids as the `tokenizers` library's `BpeTrainer` configured as `_train_bpe` in
training/tokenizer.py configures it (the ByteLevel pre-tokenizer without a prefix space, the
zoo's special tokens first, all 256 bytes in the alphabet); `BytePairEncoding.encode` gives the
same ids as the library's encoder (tests/training/test_bpe.py checks both on Tiny Shakespeare).
The zoo itself keeps the Rust library for speed; this file is the algorithm you can read.

The three steps:
1. `pretokenize` cuts the text into GPT-2's word-like pieces; merges never cross a cut.
2. `to_symbols` writes each piece's UTF-8 bytes as printable stand-in characters (`BYTE_TO_CHAR`).
3. `train_bpe` repeatedly merges the most frequent adjacent pair of symbols into a new one.
"""

from __future__ import annotations

import heapq
import unicodedata
from collections import Counter
from dataclasses import dataclass, field


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to one printable character. The printable Latin-1 bytes stand for
    themselves; the other 68 (controls, space, the soft hyphen...) are shifted to chr(256 + n) in
    byte order, so a space is "Ġ" (chr(288)) and a newline "Ċ" (chr(266))."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + shifted)
            shifted += 1
    return table


BYTE_TO_CHAR: dict[int, str] = _bytes_to_unicode()
CHAR_TO_BYTE: dict[str, int] = {char: byte for byte, char in BYTE_TO_CHAR.items()}

# ---------------------------------------------------------------------------- 1. pre-tokenization
# GPT-2's pattern, tried at each position in this order (the first alternative that matches wins):
#     's|'t|'re|'ve|'m|'ll|'d | ?\p{L}+ | ?\p{N}+ | ?[^\s\p{L}\p{N}]+ | \s+(?!\S) | \s+
# A contraction; an optional space and a run of letters; of digits; of other symbols; a run of
# whitespace that leaves its last character for the next piece (so " the" keeps its space); the
# rest of a whitespace run. Written out as a scanner, one clause per branch.

CONTRACTIONS = ("s", "t", "re", "ve", "m", "ll", "d")  # after an apostrophe, case-sensitive as in GPT-2


# \s is Unicode's White_Space property; str.isspace also counts these four separators (U+001C..U+001F).
NOT_WHITE_SPACE = frozenset("\x1c\x1d\x1e\x1f")


def _kind(char: str) -> str:
    """"L" a letter (\\p{L}), "N" a number (\\p{N}), "S" whitespace (\\s), "P" anything else.
    Letters and numbers by Python's Unicode database (`unicodedata.unidata_version`): a character
    assigned in a later Unicode version than Python knows is "P" here but may be a letter to the
    library."""
    if char.isspace() and char not in NOT_WHITE_SPACE:
        return "S"
    category = unicodedata.category(char)[0]
    return category if category in "LN" else "P"


def _run_end(text: str, start: int, kind: str) -> int:
    """The end of the run of characters of `kind` that starts at `start`."""
    end = start
    while end < len(text) and _kind(text[end]) == kind:
        end += 1
    return end


def pretokenize(text: str) -> list[str]:
    """GPT-2's pieces of `text`, which concatenate back to it; merges never cross two pieces."""
    pieces, i = [], 0
    while i < len(text):
        pieces.append(text[i:_piece_end(text, i)])
        i += len(pieces[-1])
    return pieces


def _piece_end(text: str, i: int) -> int:
    """Where the piece that starts at `i` ends, by GPT-2's pattern."""
    if text[i] == "'":  # 's|'t|'re|'ve|'m|'ll|'d
        for suffix in CONTRACTIONS:
            if text.startswith(suffix, i + 1):
                return i + 1 + len(suffix)
    # " ?\p{L}+", " ?\p{N}+", " ?[^\s\p{L}\p{N}]+": a space sticks to the run it precedes
    start = i + 1 if text[i] == " " and i + 1 < len(text) and _kind(text[i + 1]) != "S" else i
    kind = _kind(text[start])
    if kind != "S":
        return _run_end(text, start, kind)
    end = _run_end(text, i, "S")  # a whitespace run
    if end == len(text) or end - i == 1:  # "\s+(?!\S)" takes it all at the end of the text; else "\s+"
        return end
    return end - 1  # "\s+(?!\S)": all but the last, which goes with what follows


def to_symbols(piece: str) -> str:
    """The piece's UTF-8 bytes, one stand-in character each: "é" (two bytes) becomes "Ã©"."""
    return "".join(BYTE_TO_CHAR[byte] for byte in piece.encode("utf-8"))


# ---------------------------------------------------------------------------- 2. training

Pair = tuple[int, int]


@dataclass
class BytePairEncoding:
    """A trained byte-level BPE: the vocabulary (token string -> id) and the merges, in the order
    they were learned (a merge's index is its rank: lower merges first when encoding)."""

    vocab: dict[str, int]
    merges: list[tuple[str, str]]
    special_tokens: tuple[str, ...]
    _ranks: dict[tuple[str, str], int] = field(init=False, repr=False)
    _cache: dict[str, list[int]] = field(init=False, repr=False)

    def __post_init__(self):
        self._ranks = {}
        for rank, pair in enumerate(self.merges):
            self._ranks.setdefault(pair, rank)
        self._cache = {}

    def encode(self, text: str) -> list[int]:
        """Ids of `text`: special tokens matched whole first, then each piece merged on its own."""
        ids = []
        for chunk, is_special in _split_special(text, self.special_tokens):
            if is_special:
                ids.append(self.vocab[chunk])
                continue
            for piece in pretokenize(chunk):
                symbols = to_symbols(piece)
                if symbols not in self._cache:  # a text repeats its words: merge each distinct one once
                    self._cache[symbols] = [self.vocab[token] for token in self._merge_word(symbols)]
                ids.extend(self._cache[symbols])
        return ids

    def _merge_word(self, symbols: str) -> list[str]:
        """Apply the merges to one piece: always the lowest-ranked pair present, the leftmost first."""
        tokens = list(symbols)
        while len(tokens) > 1:
            ranked = [(self._ranks.get((a, b), len(self._ranks)), i) for i, (a, b) in enumerate(zip(tokens, tokens[1:]))]
            rank, i = min(ranked)
            if rank == len(self._ranks):  # no pair left that a merge knows
                break
            tokens[i:i + 2] = [tokens[i] + tokens[i + 1]]
        return tokens

    def decode(self, ids: list[int]) -> str:
        """The text of `ids`: the tokens' stand-in characters back to bytes, then UTF-8."""
        tokens = {i: token for token, i in self.vocab.items()}
        out, pending = [], bytearray()
        for i in ids:
            token = tokens[i]
            if token in self.special_tokens:
                out.append(pending.decode("utf-8", errors="replace") + token)
                pending = bytearray()
            else:
                pending.extend(CHAR_TO_BYTE[char] for char in token)
        return "".join(out) + pending.decode("utf-8", errors="replace")


def _split_special(text: str, special_tokens: tuple[str, ...]) -> list[tuple[str, bool]]:
    """`text` cut around every special token spelled in it: (chunk, is_special), in order."""
    chunks, start, i = [], 0, 0
    while i < len(text):
        special = next((s for s in special_tokens if text.startswith(s, i)), None)
        if special is None:
            i += 1
            continue
        if start < i:
            chunks.append((text[start:i], False))
        chunks.append((special, True))
        i = start = i + len(special)
    if start < len(text):
        chunks.append((text[start:], False))
    return chunks


def count_words(text: str) -> Counter:
    """How often each piece occurs, written in stand-in symbols: all training ever looks at."""
    return Counter(to_symbols(piece) for piece in pretokenize(text))


def train_bpe(text: str, vocab_size: int, special_tokens: tuple[str, ...] = ()) -> BytePairEncoding:
    """Learn merges on `text` until the vocabulary has `vocab_size` tokens (specials included).

    Ids: the special tokens first, in order; then the 256 byte symbols sorted by code point; then
    each merge's new token. The next merge is the pair of adjacent symbols that occurs most often,
    summed over every occurrence of every piece; on a tie, the pair of smaller ids (first id, then
    second), which is the library's rule.
    """
    id_to_token = list(special_tokens) + sorted(BYTE_TO_CHAR.values())
    token_to_id = {token: i for i, token in enumerate(id_to_token)}
    counted = count_words(text)
    words = [[token_to_id[char] for char in word] for word in counted]  # each distinct piece once...
    counts = list(counted.values())  # ...with how often it occurs

    pair_counts: Counter = Counter()  # occurrences of each adjacent pair, weighted by the word's count
    where: dict[Pair, set[int]] = {}  # which words hold each pair: only those change when it merges
    for w, word in enumerate(words):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += counts[w]
            where.setdefault(pair, set()).add(w)
    # A max-heap by (count, then the smaller pair), as min-heap entries (-count, pair). Counts only
    # fall after an entry is pushed, so an entry whose count is out of date is pushed back with the
    # new count instead of being merged: the entry that is current when popped is the true maximum.
    heap = [(-count, pair) for pair, count in pair_counts.items() if count > 0]
    heapq.heapify(heap)
    merges: list[Pair] = []
    while len(token_to_id) < vocab_size and heap:
        negative, pair = heapq.heappop(heap)
        if -negative != pair_counts[pair]:
            heapq.heappush(heap, (-pair_counts[pair], pair))
            continue
        if pair_counts[pair] < 1:
            break
        token = id_to_token[pair[0]] + id_to_token[pair[1]]
        if token not in token_to_id:  # two different pairs can spell the same token: it keeps one id
            token_to_id[token] = len(id_to_token)
            id_to_token.append(token)
        new = token_to_id[token]
        merges.append(pair)
        grown = set()
        for w in where[pair]:
            for changed, delta in _merge_in_word(words[w], pair, new):
                pair_counts[changed] += delta * counts[w]
                if delta > 0:
                    where.setdefault(changed, set()).add(w)
                    grown.add(changed)
        for changed in grown:  # the new token's pairs enter the heap with their full counts
            if pair_counts[changed] > 0:
                heapq.heappush(heap, (-pair_counts[changed], changed))
    return BytePairEncoding(vocab=token_to_id, merges=[(id_to_token[a], id_to_token[b]) for a, b in merges],
                            special_tokens=tuple(special_tokens))


def _merge_in_word(word: list[int], pair: Pair, new: int) -> list[tuple[Pair, int]]:
    """Replace each occurrence of `pair` in `word`, left to right, by `new`, in place, and return
    how the counts of the neighbouring pairs change: (left, a) and (b, right) lose one occurrence,
    (left, new) and (new, right) gain one. ("a a a" merging (a, a) gives "aa a": the second
    occurrence overlapped the first and is gone.)"""
    a, b = pair
    changes, i = [], 0
    while i < len(word) - 1:
        if word[i] == a and word[i + 1] == b:
            if i > 0:
                changes += [((word[i - 1], a), -1), ((word[i - 1], new), 1)]
            word[i:i + 2] = [new]
            if i < len(word) - 1:
                changes += [((b, word[i + 1]), -1), ((new, word[i + 1]), 1)]
        i += 1
    return changes
