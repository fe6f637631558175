"""Checks a command line makes before any slow work: numbers in range, an --out it can write.

`check_in` refuses a number outside its interval, NaN and infinities included (every comparison
with NaN is false, so a hand-written `if beta <= 0` lets it through and the run fails hundreds of
steps later as a NaN loss). `check_writable` proves that --out can be created and written, by
doing it, before the data is tokenized or a model trained: a read-only folder otherwise ends the
run at its first checkpoint, with a traceback.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

from architectures.utils.command_line import UserRuntimeError


def check_in(flag: str, value, interval: str, why: str = "") -> None:
    """Refuse `value` unless it is a finite number in `interval`, written as in mathematics:
    "(0, inf)", "[0, 1)", "[1, inf)". `why` says what the option does, for the message."""
    low, high = (float(x) for x in interval[1:-1].split(","))
    closed_low, closed_high = interval[0] == "[", interval[-1] == "]"
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          and (value >= low if closed_low else value > low) and (value <= high if closed_high else value < high))
    if ok:
        return
    kind = "an integer" if isinstance(value, int) and not isinstance(value, bool) else "a finite number"
    if math.isinf(low) and math.isinf(high):
        wanted = kind
    elif math.isinf(high):
        wanted = f"{kind} {'>=' if closed_low else '>'} {low:g}"
    else:
        wanted = f"a number in {interval}"
    raise ValueError(f"{flag} must be {wanted}" + (f" ({why})" if why else "") + f", got {value}")


def check_writable(out: Path, flag: str = "--out") -> None:
    """Create `out` (and its missing parents) and write a file in it, then remove what was made, so
    a refused run leaves nothing behind; a folder that cannot be made or written is refused in one
    line. Under torchrun only the main process probes (the others would race its clean-up)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    made: list[Path] = []
    try:
        missing, existing = [], out
        while not existing.exists():
            missing.append(existing)
            existing = existing.parent
        if not existing.is_dir():
            raise NotADirectoryError(f"{flag} {out} cannot be created: {existing} is a file, not a folder; "
                                     f"pass a --out inside a folder you can write")
        for folder in reversed(missing):
            folder.mkdir()
            made.append(folder)
        handle, probe = tempfile.mkstemp(prefix=".write-probe-", dir=out)
        os.close(handle)
        os.unlink(probe)
    except NotADirectoryError as e:
        if e.filename is None:  # ours, above
            raise
        raise _unwritable(out, flag, e) from None
    except OSError as e:  # read-only file system, permission denied, disk full, ...
        raise _unwritable(out, flag, e) from None
    finally:
        for folder in reversed(made):
            try:
                folder.rmdir()
            except OSError:
                pass


def _unwritable(out: Path, flag: str, e: OSError) -> UserRuntimeError:
    reason = e.strerror or type(e).__name__
    where = f" ({e.filename})" if e.filename and Path(e.filename) != out else ""
    return UserRuntimeError(f"{flag} {out} cannot be written: {reason}{where}; pass a --out in a folder you can "
                            f"write (it is created if missing)")
