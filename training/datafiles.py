"""Records from a local .json/.jsonl file or a hub dataset, with every mistake named where it is.

The pretraining corpus (training/data.py), the chat data (training/chat.py) and the preference
pairs (training/dpo/data.py) all come as records: one JSON object per line (JSON Lines), or one
JSON list of objects. `read_records` reads a local file itself, the layouts `datasets`' json
loader reads (a list of strings is a list of {"text": ...} records, as there), and refuses an
empty file, bytes that are not UTF-8, a line that is not JSON or not an object, naming the file,
the line and the layout it expected, where `datasets` would say "An error occurred while
generating the dataset". Each record comes with where it is ("data.jsonl line 7"), for the
messages of whoever checks its fields.

`hub_dataset` loads a hub dataset by name and turns any failure to fetch it (offline, a typo, a
private dataset) into one line that names it and says that a local file works too;
`local_or_hub_records` is either, as --dataset names it.
"""

from __future__ import annotations

import json
from pathlib import Path

from architectures.utils.command_line import UserRuntimeError

LAYOUT = "one JSON object per line (JSON Lines) or one JSON list of objects"


def read_records(path: Path, expected: str) -> list[tuple[str, dict]]:
    """[(where, record)] of a local .json/.jsonl file; `expected` describes the fields each record
    needs ("each with a 'text' string"), for the messages."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # a leading byte-order mark is tolerated, as `datasets` does
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ValueError(f"{path} line {line} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}): "
                         f"is it a binary file? Expected {LAYOUT}, {expected}") from None
    if not text.strip():
        raise ValueError(f"{path} is empty; expected {LAYOUT}, {expected}")
    if text.lstrip().startswith("["):
        return _from_list(path, text, expected)
    records = []
    # split("\n"), not splitlines(): a JSON string may hold U+2028 and other separators unescaped
    for number, line in enumerate(text.split("\n"), 1):
        if line.strip():
            records.append((f"{path} line {number}", _parse(line, f"{path} line {number}", expected)))
    return records


def _parse(line: str, where: str, expected: str) -> dict:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where} is not JSON ({e.msg} at column {e.colno}); expected {LAYOUT}, {expected}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{where} is a JSON {_kind(value)}, not an object; expected {LAYOUT}, {expected}")
    return value


def _from_list(path: Path, text: str, expected: str) -> list[tuple[str, dict]]:
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} line {e.lineno} is not JSON ({e.msg} at column {e.colno}); expected {LAYOUT}, "
                         f"{expected}") from None
    if not items:
        raise ValueError(f"{path} holds an empty list; expected {LAYOUT}, {expected}")
    records = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            item = {"text": item}  # `datasets` reads a list of strings as a "text" column
        if not isinstance(item, dict):
            raise ValueError(f"{path} item {i} is a JSON {_kind(item)}, not an object; expected {LAYOUT}, {expected}")
        records.append((f"{path} item {i}", item))
    return records


def _kind(value) -> str:
    return {list: "list", str: "string", bool: "boolean", type(None): "null", dict: "object"}.get(type(value), "number")


def local_or_hub_records(source: str, split: str, what: str, expected: str, cache: Path) -> list[tuple[str, dict]]:
    """[(where, record)] of `source`: a local .json/.jsonl file (`read_records`), or the `split` of a
    hub dataset of that name (`hub_dataset`). `what` names the data in messages ("chat data")."""
    path = Path(source).expanduser()
    if path.suffix in (".json", ".jsonl"):
        if not path.is_file():
            raise FileNotFoundError(f"{what} file {path} does not exist")
        return read_records(path, expected)
    if path.exists():
        raise ValueError(f"{what} {path} must be a .json or .jsonl file (or a hub dataset name)")
    return [(f"{source} row {i}", record) for i, record in enumerate(hub_dataset(source, split, cache))]


def hub_dataset(name: str, split: str, cache: Path, flag: str = "--dataset"):
    """The `split` of the Hugging Face hub dataset `name`, through `datasets` (cached in `cache`)."""
    try:
        import datasets  # lazily: local files and Tiny Shakespeare need no `datasets`
    except ImportError:
        raise UserRuntimeError(f"{flag} {name!r} is not a local file, so it names a Hugging Face hub dataset, and "
                               f"loading one needs the `datasets` package (pip install datasets); a local "
                               f".json/.jsonl file needs nothing") from None
    try:
        return datasets.load_dataset(name, split=split, cache_dir=str(cache))
    except Exception as e:  # the hub client raises many types: connection, not found, gated, no such split
        reason = " ".join(f"{type(e).__name__}: {e}".split())
        reason = reason if len(reason) <= 200 else reason[:197] + "..."
        raise UserRuntimeError(f"{flag} {name!r} is not a local file, so it was looked up as a Hugging Face hub "
                               f"dataset, and it could not be fetched (offline, or no such dataset: {reason}); pass "
                               f"the path of a local .json/.jsonl file instead, or check the name and the network"
                               ) from e
