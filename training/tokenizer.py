"""The one tokenizer every model and method of the zoo uses, read beside notes/tokenizer.md.

Three kinds behind one face:
- "bpe": byte-level byte-pair encoding (Sennrich et al. 2016, "Neural Machine Translation of
  Rare Words with Subword Units", arXiv:1508.07909; byte-level as in GPT-2, Radford et al.
  2019), trained with the Hugging Face `tokenizers` library. Any Unicode string round-trips.
- "char": one token per distinct character of the training text, for the classic
  character-level Tiny Shakespeare runs. A character it never saw is an error, not an <unk>.
- "pretrained": any Hugging Face tokenizer.json, e.g. Llama 3's.
Our kinds reserve SPECIAL_TOKENS at ids 0..4, so chat fine-tuning (SFT, DPO) reuses the
pretraining tokenizer unchanged. Tested by exact round trips (hypothesis) and by loading a
Hugging Face-style file built with `tokenizers` itself (tests/training/test_tokenizer.py).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from architectures.utils.files import atomic_write, atomic_write_json
from training import data

SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>", "<|user|>", "<|assistant|>")  # ids 0..4, in this order
MIN_BPE_VOCAB = 256 + len(SPECIAL_TOKENS)  # every byte must be a token, or some text could not be encoded
KINDS = ("bpe", "char")  # what Tokenizer.train makes; "pretrained" only comes from a file
SIDECAR = "tokenizer_config.json"  # where Hugging Face keeps the bos/eos/pad names; so do we

# Names of the special tokens in the files we expect to meet, ours first, then Llama 3's,
# then SentencePiece-style ones. The first present in the vocabulary wins.
_BOS_NAMES = ("<|bos|>", "<|begin_of_text|>", "<s>", "<bos>")
_EOS_NAMES = ("<|eos|>", "<|end_of_text|>", "<|eot_id|>", "</s>", "<eos>", "<|endoftext|>")
_PAD_NAMES = ("<|pad|>", "<pad>")


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the bos/eos/pad ids and the checks the zoo relies on."""

    def __init__(self, backend: tokenizers.Tokenizer, bos_token: str | None = None,
                 eos_token: str | None = None, pad_token: str | None = None):
        self.backend = backend
        vocab = backend.get_vocab(with_added_tokens=True)
        # max id + 1, not len(vocab): pretrained files may leave ids unused, and an embedding
        # table needs a row for the largest id.
        self.vocab_size: int = max(vocab.values()) + 1
        first = tuple(backend.id_to_token(i) for i in range(len(SPECIAL_TOKENS)))
        if first != SPECIAL_TOKENS:
            self.kind = "pretrained"
        else:  # our char tokenizer is the only one whose decoder just concatenates tokens
            self.kind = "char" if isinstance(backend.decoder, decoders.Fuse) else "bpe"
        names = {}
        for role, given, candidates in (("bos", bos_token, _BOS_NAMES), ("eos", eos_token, _EOS_NAMES),
                                        ("pad", pad_token, _PAD_NAMES)):
            if given is not None and given not in vocab:
                raise ValueError(f"{role}_token {given!r} is not in the vocabulary of {self.vocab_size} tokens")
            names[role] = given if given is not None else next((c for c in candidates if c in vocab), None)
        self.bos_token, self.eos_token, self.pad_token = names["bos"], names["eos"], names["pad"]
        self.bos_id: int | None = vocab.get(self.bos_token)
        self.eos_id: int | None = vocab.get(self.eos_token)
        self.pad_id: int | None = vocab.get(self.pad_token)
        self._alphabet = set(vocab) - set(SPECIAL_TOKENS) if self.kind == "char" else None

    # ------------------------------------------------------------------------ making one

    @classmethod
    def train(cls, text: str, vocab_size: int = 512, kind: str = "bpe") -> "Tokenizer":
        """Train on `text`. For "char", vocab_size is ignored: it is 5 + the distinct characters."""
        if kind not in KINDS:
            raise ValueError(f"unknown tokenizer kind {kind!r}; train 'bpe' (byte-level BPE) or 'char' "
                             f"(one token per character); load pretrained ones with Tokenizer.from_file")
        if not text:
            raise ValueError("cannot train a tokenizer on empty text")
        return cls(_train_char(text) if kind == "char" else _train_bpe(text, vocab_size))

    @classmethod
    def from_file(cls, path: str | Path) -> "Tokenizer":
        """Load a tokenizer.json (ours or Hugging Face's); `path` may be its folder.

        If a tokenizer_config.json sits beside it, its bos/eos/pad names win over detection
        (that is how Llama 3 Instruct says its end of turn is <|eot_id|>).
        """
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"no tokenizer file at {path}; train one with training.tokenizer.get_tokenizer(text) "
                f"(or Tokenizer.train(text).save(path)), or pass a Hugging Face tokenizer.json")
        raw = path.read_text(encoding="utf-8")
        _parse_json(raw, path)
        try:
            backend = tokenizers.Tokenizer.from_str(raw)
        except Exception as e:  # the Rust side raises a bare Exception
            raise ValueError(f"{path} is JSON but not a tokenizer the `tokenizers` library can read: {e}") from e
        names = {}
        sidecar = path.parent / SIDECAR
        if sidecar.is_file():
            config = _parse_json(sidecar.read_text(encoding="utf-8"), sidecar)
            for role in ("bos", "eos", "pad"):
                value = config.get(f"{role}_token")
                # Hugging Face writes either "<s>" or {"content": "<s>", "lstrip": ...}
                names[f"{role}_token"] = value.get("content") if isinstance(value, dict) else value
        return cls(backend, **names)

    def save(self, path: str | Path) -> Path:
        """Write tokenizer.json to `path` (a file, or a folder to put it in) and the bos/eos/pad
        names to tokenizer_config.json beside it, each atomically. Returns the tokenizer.json path."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        atomic_write(path, lambda tmp: Path(tmp).write_text(self.to_json(), encoding="utf-8"))
        atomic_write_json(path.parent / SIDECAR, {"bos_token": self.bos_token, "eos_token": self.eos_token,
                                                  "pad_token": self.pad_token})
        return path

    def to_json(self) -> str:
        """The tokenizer.json text: everything that decides which ids a text gets."""
        return self.backend.to_str(pretty=True)

    # ------------------------------------------------------------------------ using one

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text`, with bos/eos only when asked for.

        One call into the backend for the whole text (1.1 MB in about a second), so there is
        no chunking whose boundaries could change the result.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        if self.kind == "char":
            self._check_alphabet(text)
        # add_special_tokens=False: a pretrained file's post-processor (Llama 3's prepends
        # <|begin_of_text|>) must not add tokens the caller did not ask for.
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if bos:
            ids = [self._special_id("bos")] + ids
        if eos:
            ids.append(self._special_id("eos"))
        return ids

    def decode(self, ids) -> str:
        """Text of a 1-D sequence of ids (list, tuple or tensor). Special tokens are kept, so
        decode(encode(s)) == s even when s spells one, and a sample shows where a model ended."""
        if hasattr(ids, "ndim"):  # a tensor or array
            if ids.ndim != 1:
                raise ValueError(f"decode takes a 1-D sequence of ids, got shape {tuple(ids.shape)}; "
                                 f"decode each row of a batch separately")
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        bad = next((i for i in ids if not 0 <= i < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the vocabulary (vocab_size={self.vocab_size}, "
                             f"ids 0..{self.vocab_size - 1}); were the ids made with another tokenizer "
                             f"or sampled from a model with a larger output layer?")
        return self.backend.decode(ids, skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def __repr__(self) -> str:
        return (f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, bos={self.bos_token!r}, "
                f"eos={self.eos_token!r}, pad={self.pad_token!r})")

    def _special_id(self, role: str) -> int:
        token_id = getattr(self, f"{role}_id")
        if token_id is None:
            raise ValueError(f"this {self.kind} tokenizer has no {role} token; pass {role}_token= when "
                             f"constructing it, or encode without {role}=True")
        return token_id

    def _check_alphabet(self, text: str) -> None:
        unseen = set(text) - self._alphabet
        if unseen:  # special tokens are matched whole, so their characters may be outside the alphabet
            rest = text
            for special in SPECIAL_TOKENS:
                rest = rest.replace(special, "")
            unseen = set(rest) - self._alphabet
        if unseen:
            char = min(unseen, key=text.index)
            raise ValueError(
                f"character {char!r} (U+{ord(char):04X}) at index {text.index(char)} is not in this char "
                f"tokenizer's alphabet of {len(self._alphabet)} characters, and a char tokenizer has no "
                f"unknown token; train it on text that contains the character, or use kind='bpe', which "
                f"encodes any string")


def _train_bpe(text: str, vocab_size: int) -> tokenizers.Tokenizer:
    if vocab_size < MIN_BPE_VOCAB:
        raise ValueError(f"vocab_size={vocab_size} is too small for byte-level BPE: the 256 byte tokens and "
                         f"{len(SPECIAL_TOKENS)} special tokens need {MIN_BPE_VOCAB}; pass vocab_size >= "
                         f"{MIN_BPE_VOCAB}, or kind='char'")
    backend = tokenizers.Tokenizer(models.BPE())
    # The ByteLevel pre-tokenizer maps each UTF-8 byte to one printable stand-in character
    # (a space becomes "Ġ") and splits words GPT-2's way, so merges never cross a word start.
    # add_prefix_space=False: " the" and "the" at the start of a text stay different, and
    # decode(encode(s)) is exactly s.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),  # the trainer gives these the first ids, in order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen in `text` or not
        show_progress=False,
    )
    backend.train_from_iterator([text], trainer)
    return backend


def _train_char(text: str) -> tokenizers.Tokenizer:
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + tuple(sorted(set(text))))}
    # A BPE model with no merges maps each character to its own id; no pre-tokenizer, so
    # whitespace is a character like any other. Fuse decodes by plain concatenation.
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(SPECIAL_TOKENS))  # matched whole in the text, before the model
    return backend


def _parse_json(raw: str, path: Path):
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); it may be truncated or a Git LFS pointer: "
                         f"download or save it again") from e


def get_tokenizer(text: str, kind: str = "bpe", vocab_size: int = 512, cache_dir: str | Path | None = None) -> Tokenizer:
    """Train a tokenizer on `text` once, then load it from the cache on every later call.

    Cached as <cache_dir>/<kind>[<vocab_size>]-<hash>/tokenizer.json, default cache_dir
    training.data.cache_dir() / "tokenizers"; the hash is sha256 of (text, kind, vocab_size).
    """
    path = tokenizer_cache_path(text, kind, vocab_size, cache_dir)
    if path.is_file():
        return Tokenizer.from_file(path)
    tokenizer = Tokenizer.train(text, vocab_size, kind)
    tokenizer.save(path)
    return tokenizer


def tokenizer_cache_path(text: str, kind: str = "bpe", vocab_size: int = 512, cache_dir: str | Path | None = None) -> Path:
    """The tokenizer.json `get_tokenizer` reads or writes for these arguments (it may not exist yet)."""
    size = vocab_size if kind == "bpe" else None  # a char vocabulary follows from the text alone
    key = hashlib.sha256(f"{kind}\0{size}\0".encode() + text.encode("utf-8", "surrogatepass")).hexdigest()
    root = Path(cache_dir) if cache_dir is not None else data.cache_dir() / "tokenizers"
    return root / f"{kind}{size or ''}-{key[:16]}" / "tokenizer.json"


def fingerprint(tokenizer: Tokenizer) -> str:
    """sha256 of the tokenizer.json text: equal fingerprints give every text the same ids."""
    return hashlib.sha256(tokenizer.to_json().encode("utf-8")).hexdigest()
