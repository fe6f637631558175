"""Files written atomically, and the JSON and JSON-lines files every command reads back.

A write goes to a temporary file in the same folder, is flushed to disk (fsync) and renamed
onto its name in one step, so a crash or a Ctrl-C never leaves half a checkpoint, half a
tokenizer or half a summary behind: the old file or the new one, nothing between.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def atomic_write(path: str | Path, write) -> None:
    """Call write(tmp_path) and then rename tmp_path onto `path` in one atomic step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    # mkstemp makes the file readable by its owner alone (0600); the renamed file gets the mode
    # any other file the user writes gets (0666 less the umask), like every other output.
    os.chmod(tmp, 0o666 & ~current_umask())
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def current_umask() -> int:
    """The process's umask (os.umask can only be read by setting it, so it is set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))


def read_jsonl(path: str | Path) -> list[dict]:
    """Every line of a JSON-lines file (metrics.jsonl) as a dict, in order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
