"""The one data layer: find a corpus, split it, tokenize it once, and serve batches.

`load_corpus` turns a source name into one string: "tinyshakespeare" (Karpathy's char-rnn
corpus, 1,115,394 bytes, verified by sha256), a local .txt/.json/.jsonl file, or a Hugging
Face hub dataset. `get_corpus` returns the same text as a `Corpus` that also says what it is,
where this copy came from and its sha256: a machine that cannot download Tiny Shakespeare
trains on an embedded stand-in, and everything a run reports names it as such
(`FALLBACK_NAME`), and the sha256 lets a resumed run check that it reads the text it began on. `split_text` holds out the last 10% of the characters for validation, the
split nanoGPT uses, so our losses compare with published ones. `prepare_data` tokenizes each
split once into uint16/uint32 files on disk and maps them into memory; `TokenData.get_batch`
draws (input, target) windows whose offsets depend only on the generator it is given, which
is what makes resumed and multi-process runs see the same batches as one uninterrupted run.

`datasets` is imported only for hub datasets (local .json/.jsonl files are read and checked by
training/datafiles.py): a machine without it (or without internet) can still run the quick start.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from architectures.utils.command_line import UserRuntimeError
from architectures.utils.files import atomic_write, atomic_write_json
from training.datafiles import hub_dataset, read_records

DATA_DIR_ENV = "ZOO_DATA_DIR"  # a folder holding tinyshakespeare.txt (CI points it at ../shared/data)
CACHE_DIR_ENV = "ZOO_CACHE_DIR"  # where downloads, tokenizers and token files are cached
TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"  # 1,115,394 bytes
TINYSHAKESPEARE_FILE = "tinyshakespeare.txt"
DOWNLOAD_TIMEOUT_S = 10  # short: offline machines should fall back at once, not hang
# What a run on the stand-in corpus is called wherever it reports, so that none of its figures
# can pass for Tiny Shakespeare's.
FALLBACK_NAME = "embedded pydoc_data.topics (offline fallback, NOT Tiny Shakespeare)"


class NoTinyShakespeare(UserRuntimeError):
    """Tiny Shakespeare was found nowhere, and the caller wants no stand-in."""


def cache_dir() -> Path:
    """$ZOO_CACHE_DIR, else $XDG_CACHE_HOME/llm-zoo, else ~/.cache/llm-zoo (created on first write)."""
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "llm-zoo"


_default_cache_dir = cache_dir  # prepare_data's `cache_dir` argument shadows the function's name


# ---------------------------------------------------------------------------- corpora


@dataclass(frozen=True)
class Corpus:
    """A corpus's text, what it is, and where this copy of it came from."""

    text: str
    name: str  # what the text is: "tinyshakespeare", a file path, a hub dataset name, or FALLBACK_NAME
    origin: str  # where this copy was read from (a file, the cache, a URL), for the log
    sha256: str  # of the UTF-8 text: the fingerprint a resumed run must match

    @property
    def is_fallback(self) -> bool:
        return self.name == FALLBACK_NAME


def load_corpus(source: str = "tinyshakespeare", text_column: str = "text") -> str:
    """The whole corpus as one string.

    source: "tinyshakespeare" | a .txt file (read whole) | a .json/.jsonl file (the
    `text_column` of every record, joined by a blank line) | a Hugging Face hub dataset name
    (its "train" split, same column handling; needs internet).
    """
    return get_corpus(source, text_column).text


def get_corpus(source: str = "tinyshakespeare", text_column: str = "text", fallback: bool = True) -> Corpus:
    """`load_corpus`'s text as a `Corpus`: with its name, its origin and its sha256. With `fallback`
    False, Tiny Shakespeare found nowhere raises `NoTinyShakespeare` instead of falling back."""
    text, name, origin = _find_corpus(source, text_column, fallback)
    return Corpus(text, name, origin, hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest())


def _find_corpus(source: str, text_column: str, fallback: bool = True) -> tuple[str, str, str]:
    """(text, name, origin) of a source."""
    if source == "tinyshakespeare":
        return _tinyshakespeare(fallback)
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix == ".txt":
            # Read whole by Python, no `datasets` needed; like any text-mode read, "\r\n" becomes "\n".
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"corpus file {path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                                 f"{e.start}): is it a binary file? A .txt corpus must be UTF-8 text") from None
            if not text:
                raise ValueError(f"corpus file {path} is empty; pass a .txt file of UTF-8 text")
            return text, str(path), f"the file {path}"
        if path.suffix in (".json", ".jsonl"):
            text = _text_of_records(path, text_column)
            return text, str(path), f"the {text_column!r} field of every record of {path}"
        raise ValueError(f"corpus file {path} has suffix {path.suffix!r}; supported: .txt, .json, .jsonl")
    if path.exists():
        raise ValueError(f"corpus source {path} is a directory; pass one .txt, .json or .jsonl file")
    if path.suffix in (".txt", ".json", ".jsonl") or source.startswith((".", "/", "~")):
        raise FileNotFoundError(
            f"corpus file {path} does not exist; pass an existing .txt/.json/.jsonl path, "
            f"'tinyshakespeare', or a Hugging Face hub dataset name"
        )
    # cache_dir keeps datasets' Arrow files under our cache, not in ~/.cache/huggingface.
    ds = hub_dataset(source, "train", cache_dir() / "datasets")
    if text_column not in ds.column_names:
        raise ValueError(f"the hub dataset {source!r} has no column {text_column!r}; its columns are {ds.column_names}; "
                         f"pass text_column= one of them")
    return "\n\n".join(ds[text_column]), source, f"the Hugging Face hub dataset {source!r}"


def _text_of_records(path: Path, text_column: str) -> str:
    """The `text_column` strings of a local .json/.jsonl file's records, joined by a blank line."""
    texts = []
    for where, record in read_records(path, f"each with a {text_column!r} string"):
        if text_column not in record:
            raise ValueError(f"{where} has no column {text_column!r}; its columns are {list(record)}; every record "
                             f"of a corpus needs a {text_column!r} string (or pass text_column= one of them)")
        if not isinstance(record[text_column], str):
            raise ValueError(f"{where}: column {text_column!r} holds a {type(record[text_column]).__name__}, "
                             f"not a string")
        texts.append(record[text_column])
    return "\n\n".join(texts)


def _tinyshakespeare(fallback: bool = True) -> tuple[str, str, str]:
    """(text, name, origin): from $ZOO_DATA_DIR, else the cache, else the internet, else (with
    `fallback`) an embedded stand-in, named FALLBACK_NAME."""
    cached = cache_dir() / TINYSHAKESPEARE_FILE
    if os.environ.get(DATA_DIR_ENV):
        provided = Path(os.environ[DATA_DIR_ENV]) / TINYSHAKESPEARE_FILE
        # Set but wrong is an error, not a reason to fall back: the run would quietly train on
        # something else while its figures say Tiny Shakespeare.
        if not provided.is_file():
            raise FileNotFoundError(
                f"${DATA_DIR_ENV} is {os.environ[DATA_DIR_ENV]!r}, but {provided} does not exist; point it at "
                f"the folder that holds {TINYSHAKESPEARE_FILE}, or unset it to use the cache or the download"
            )
        data = provided.read_bytes()
        _check_sha256(data, f"{provided} (found through ${DATA_DIR_ENV})",
                      fix=f"replace it with a fresh download of {TINYSHAKESPEARE_URL} or unset {DATA_DIR_ENV}")
        return data.decode("utf-8"), "tinyshakespeare", f"{provided} (${DATA_DIR_ENV})"
    if cached.is_file():
        data = cached.read_bytes()
        try:
            _check_sha256(data, str(cached), fix="the file was deleted; run again to download a fresh copy")
        except ValueError:
            cached.unlink()  # ours to delete, so the next run downloads a fresh copy
            raise
        return data.decode("utf-8"), "tinyshakespeare", f"{cached} (downloaded earlier)"
    try:
        with urllib.request.urlopen(TINYSHAKESPEARE_URL, timeout=DOWNLOAD_TIMEOUT_S) as response:
            data = response.read()
    except OSError as e:  # URLError, HTTPError, timeouts and DNS failures are all OSErrors
        if not fallback:
            raise NoTinyShakespeare(f"Tiny Shakespeare is not in ${DATA_DIR_ENV} or the cache, and its download from "
                                    f"{TINYSHAKESPEARE_URL} failed ({e})") from e
        text = embedded_corpus()
        print(f"tinyshakespeare: download of {TINYSHAKESPEARE_URL} failed ({e}); falling back to the embedded "
              f"corpus pydoc_data.topics ({len(text):,} chars) - set {DATA_DIR_ENV} to a folder with "
              f"{TINYSHAKESPEARE_FILE} to use the real one; every figure of this run is labelled "
              f"{FALLBACK_NAME!r}", file=sys.stderr, flush=True)
        return text, FALLBACK_NAME, f"pydoc_data.topics of this Python (download of {TINYSHAKESPEARE_URL} failed)"
    # Checked before writing, so a bad download never reaches the cache.
    _check_sha256(data, f"the download from {TINYSHAKESPEARE_URL}",
                  fix="nothing was saved; check your network or proxy and run again")
    atomic_write(cached, lambda tmp: Path(tmp).write_bytes(data))
    return data.decode("utf-8"), "tinyshakespeare", f"{TINYSHAKESPEARE_URL} (downloaded now, cached in {cached})"


def _check_sha256(data: bytes, origin: str, fix: str) -> None:
    digest = hashlib.sha256(data).hexdigest()
    if digest != TINYSHAKESPEARE_SHA256:
        raise ValueError(
            f"checksum mismatch: {origin} has sha256 {digest} ({len(data):,} bytes), but Tiny Shakespeare "
            f"has sha256 {TINYSHAKESPEARE_SHA256} (1,115,394 bytes); {fix}"
        )


def embedded_corpus() -> str:
    """English prose every Python install carries: the help topics of `pydoc` (about 465 k chars)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics.values())


def split_text(text: str, val_fraction: float = 0.1) -> tuple[str, str]:
    """(train, val): validation is the LAST `val_fraction` of the characters, as nanoGPT splits."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction} must be strictly between 0 and 1 (0.1 holds out the last 10%)")
    cut = int(len(text) * (1 - val_fraction))  # for 0.1 this is nanoGPT's int(n * 0.9)
    return text[:cut], text[cut:]


# ---------------------------------------------------------------------------- tokens


@dataclass
class TokenData:
    """Token ids of both splits, zero-copy views of the memory-mapped cache files."""

    train: torch.Tensor  # (N_train,) torch.uint16, or torch.uint32 for vocabularies over 65,536
    val: torch.Tensor  # (N_val,) same dtype
    train_chars: int  # characters of text the train tokens came from
    val_chars: int
    vocab_size: int

    @property
    def val_chars_per_token(self) -> float:
        """nats/char = (nats/token) / (chars/token) = loss_per_token * val_tokens / val_chars."""
        return self.val_chars / len(self.val)

    def get_batch(self, split: str, batch_size: int, block_size: int,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y: int64 (batch_size, block_size) on the CPU, y[b, t] = x[b, t + 1] (next token).

        The window offsets come from `generator` (a CPU generator) and nothing else, so a caller
        that seeds it from (seed, step) gets the same batch on a resume or on every DDP rank.
        """
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        tokens = self.train if split == "train" else self.val
        n = len(tokens)
        if n < block_size + 1:
            raise ValueError(
                f"the {split} split has {n:,} tokens, but block_size={block_size} needs at least "
                f"{block_size + 1:,} (inputs plus the one-token-shifted targets); pass a smaller "
                f"--block-size or use more data"
            )
        starts = torch.randint(n - block_size, (batch_size,), generator=generator)  # (B,) in [0, n - T - 1]
        windows = torch.stack([tokens[s : s + block_size + 1] for s in starts.tolist()]).long()  # (B, T + 1)
        # contiguous copies: callers flatten targets with .view(-1)
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


def prepare_data(source: str, tokenizer, cache_dir: str | Path | None = None, val_fraction: float = 0.1,
                 text: str | None = None) -> TokenData:
    """Load `source`, split its text, tokenize both parts once, and map the cached ids.

    The text is split before tokenizing, so the validation characters are exactly the last
    10% whatever the tokenizer. The cache key is sha256 of (text, tokenizer JSON,
    val_fraction): a different corpus or tokenizer never reuses stale ids. A caller that
    has already loaded the corpus passes it as `text`.
    """
    text = load_corpus(source) if text is None else text
    train_text, val_text = split_text(text, val_fraction)
    folder = token_cache_folder(text, tokenizer, val_fraction, cache_dir)
    meta_path = folder / "meta.json"
    if not meta_path.is_file():  # meta.json is written last: if it exists, both .bin files are whole
        _write_token_cache(folder, source, tokenizer, train_text, val_text)
    meta = json.loads(meta_path.read_text())
    dtype = np.dtype(meta["dtype"])
    # mode="c" (copy-on-write) is a private, writable mapping: torch.from_numpy needs a writable
    # array, and nothing a caller does can ever change the file on disk.
    views = {split: torch.from_numpy(np.memmap(folder / f"{split}.bin", dtype=dtype, mode="c",
                                               shape=(meta[f"{split}_tokens"],)))
             for split in ("train", "val")}
    return TokenData(train=views["train"], val=views["val"], train_chars=meta["train_chars"],
                     val_chars=meta["val_chars"], vocab_size=meta["vocab_size"])


def token_cache_folder(text: str, tokenizer, val_fraction: float = 0.1, cache_dir: str | Path | None = None) -> Path:
    """Where `prepare_data` caches the token ids of `text` under `tokenizer` (it may not exist yet)."""
    key = hashlib.sha256()
    for part in (text, tokenizer.to_json(), repr(val_fraction)):
        key.update(part.encode("utf-8", "surrogatepass") + b"\0")
    return (Path(cache_dir) if cache_dir is not None else _default_cache_dir() / "tokens") / key.hexdigest()[:24]


def _write_token_cache(folder: Path, source: str, tokenizer, train_text: str, val_text: str) -> None:
    # uint16 holds ids 0..65535, half the disk and page cache of uint32
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    meta = {"source": source, "dtype": np.dtype(dtype).name, "vocab_size": tokenizer.vocab_size}
    for split, part in (("train", train_text), ("val", val_text)):
        ids = np.asarray(tokenizer.encode(part), dtype=dtype)
        if len(ids) == 0:
            raise ValueError(
                f"the {split} split of {source!r} is empty ({len(train_text) + len(val_text):,} characters "
                f"in all); use a larger corpus"
            )
        atomic_write(folder / f"{split}.bin", lambda tmp: ids.tofile(tmp))
        meta[f"{split}_tokens"], meta[f"{split}_chars"] = len(ids), len(part)
    atomic_write_json(folder / "meta.json", meta)
