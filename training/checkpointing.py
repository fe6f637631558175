"""Atomic, resumable checkpoints for the training loop.

A checkpoint directory holds
- the model's own files (config.json, model.safetensors, tokenizer.json: whatever
  `save_model` writes, loadable by the architecture's `from_pretrained` and by transformers);
- `train_state/`: weights and AdamW moments in torch.distributed.checkpoint (DCP) format, which
  every process writes its own shard of, and which loads back on any number of processes (a
  run saved by 2 FSDP processes resumes on 1);
- `trainer_state.pt`: scheduler, RNG states, step, the configs the run was started with
  (data fingerprints included: training/cli.py records the corpus's and the tokenizer's sha256),
  and the loop's partial log window, so a resumed run logs the losses the uninterrupted one does.

Atomicity is a two-phase commit: every file is first written into `OUT/.pending/`, then a
`COMMIT` marker is written there, then the files are moved into place. A crash before the
marker leaves the previous checkpoint untouched (the pending folder is discarded); a crash
after it is finished on the next load (roll forward). Either way all files agree.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from pathlib import Path

import torch

from architectures.utils.files import atomic_write, atomic_write_json

PENDING = ".pending"
STATE_FILE = "trainer_state.pt"
DCP_DIR = "train_state"


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns that it assumes one process when no process group exists: here that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _recover(out: Path) -> None:
    pending = out / PENDING
    if not pending.is_dir():
        return
    if (pending / "COMMIT").is_file():
        for f in pending.iterdir():
            if f.name != "COMMIT":
                if f.is_dir() and (out / f.name).exists():
                    shutil.rmtree(out / f.name)  # idempotent: a crash here is finished by the next call
                os.replace(f, out / f.name)
    shutil.rmtree(pending)


def check_fresh(out: Path) -> None:
    """Refuse to start a new run in `out` where an earlier run's checkpoint is (committed, or
    committed and not yet moved into place); read-only."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file; pass a directory (it is created if missing)")
    if (out / STATE_FILE).exists() or (out / PENDING / "COMMIT").is_file():
        raise FileExistsError(
            f"{out} already holds a training checkpoint; pass --resume to continue it, or choose another --out"
        )


def start_fresh(out: Path) -> None:
    """A new run in `out`: refuse to mix with an earlier run's checkpoint."""
    _recover(out)
    check_fresh(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)


def save(out: Path, model, optimizer, scheduler, step: int, record: dict, save_model, dd,
         loop_state: dict | None = None) -> None:
    """Collective: every process calls it (each writes its DCP shard); the main process commits.
    `loop_state` is whatever else the loop needs back on resume (tensors, numbers, dicts of them)."""
    # Imported here: DCP takes most of a second to import, which a command that only checks
    # its arguments or prints --help should not pay.
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    pending = out / PENDING
    if dd.is_main:
        shutil.rmtree(pending, ignore_errors=True)
        pending.mkdir(parents=True)
    dd.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    with _quiet_single_process():
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=pending / DCP_DIR)
    # The portable export needs whole tensors: FSDP2 gathers its shards (onto the CPU of every process).
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)) \
        if dd.enabled and dd.strategy == "fsdp" else None
    if dd.is_main:
        save_model(model, pending, full)
        # The files save_model wrote: a resume refuses a checkpoint that has lost one of them.
        files = sorted(f.name for f in pending.iterdir() if f.name not in (DCP_DIR, STATE_FILE))
        state = {
            "step": step,
            "files": files,
            "record": record,
            "scheduler": scheduler.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "loop": loop_state,
        }
        atomic_write(pending / STATE_FILE, lambda tmp: torch.save(state, tmp))
        atomic_write_json(pending / "COMMIT", {"step": step})  # the commit point
        _recover(out)
    dd.barrier()


def _differences(saved: dict, now: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(saved) | set(now)):
        a, b = saved.get(k), now.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: checkpoint {a!r} vs now {b!r}")
    return out


def _check_resumable(out: Path) -> Path:
    """The state file of the checkpoint in `out`, or an error that says why there is none."""
    if not out.exists():
        raise FileNotFoundError(f"--resume: {out} does not exist, so there is no run to continue; "
                                f"check --out, or start a new run without --resume")
    if not out.is_dir():
        raise NotADirectoryError(f"--resume: {out} is a file, not a run directory; check --out")
    state_file = out / STATE_FILE
    if not state_file.is_file() or not (out / DCP_DIR).is_dir():
        raise FileNotFoundError(f"--resume: {out} holds no checkpoint ({STATE_FILE} and {DCP_DIR}/); a run saves one "
                                f"every --checkpoint-interval steps and at its end; start a new run without --resume")
    return state_file


def read_record(out: Path) -> dict:
    """The configs (and data fingerprints) the checkpoint in `out` was made with, read before
    anything is built, so that a resume that cannot work fails first."""
    # Read-only, so every process may call it at once: a committed save that was not yet moved
    # into place (a crash after COMMIT) is read where it lies, and `load` finishes the move.
    committed = out / PENDING
    folder = committed if (committed / "COMMIT").is_file() else out
    state = torch.load(_check_resumable(folder), map_location="cpu", weights_only=True)
    require_files(folder, state.get("files", ()), out)
    return state["record"]


def require_files(folder: Path, names, out: Path | None = None) -> None:
    """On --resume: refuse a checkpoint in `folder` that lacks one of the files `names`."""
    missing = [name for name in names if not (folder / name).exists()]
    if missing:
        raise FileNotFoundError(f"--resume: the checkpoint in {out or folder} is missing {', '.join(missing)}, so it "
                                f"is partial and cannot be resumed; restore the file, or start a new run in another "
                                f"--out")


def check_record(out: Path, saved: dict, now: dict, may_change: set[str], common_only: bool = False) -> None:
    """On --resume: the configs the run is started with (`now`) must be those the checkpoint in `out`
    was made with (`saved`), but for the loop's fields in `may_change`. With `common_only`, only
    the fields both records have are compared: an early check, made before all of `now` is known."""
    def comparable(record: dict, other: dict) -> dict:
        kept = {}
        for part, fields in record.items():
            if common_only and part not in other:
                continue
            if isinstance(fields, dict):
                fields = {f: v for f, v in fields.items() if not (part == "train" and f in may_change)
                          and not (common_only and isinstance(other[part], dict) and f not in other[part])}
            kept[part] = fields
        return json.loads(json.dumps(kept))  # tuples and lists compare alike

    diffs = _differences(comparable(saved, now), comparable(now, saved))
    if diffs:
        raise ValueError(f"--resume: the checkpoint in {out} was made with a different configuration: "
                         + "; ".join(diffs) + ". Resume with the same --preset and settings, or start a new run in "
                                              "another --out")


def load(out: Path, model, optimizer, scheduler, record: dict, may_change: set[str],
         dd) -> tuple[int, list[dict], dict | None]:
    """Restore a run from `out` on any number of processes; returns (step reached, metrics up to
    it, the `loop_state` it was saved with)."""
    if dd.is_main and out.is_dir():
        _recover(out)
    dd.barrier()
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    state_file = _check_resumable(out)
    state = torch.load(state_file, map_location="cpu", weights_only=True)
    require_files(out, state.get("files", ()))
    check_record(out, state["record"], record, may_change)
    model_state, optim_state = get_state_dict(model, optimizer)
    sharded = {"model": model_state, "optim": optim_state}
    with _quiet_single_process():
        dcp.load(sharded, checkpoint_id=out / DCP_DIR)  # reshards to however many processes load it
    set_state_dict(model, optimizer, model_state_dict=sharded["model"], optim_state_dict=sharded["optim"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng_cpu"])
    if state["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    step = state["step"]
    # Metrics logged after the checkpoint belong to the interrupted attempt: drop them.
    history = []
    metrics = out / "metrics.jsonl"
    if metrics.is_file():
        history = [e for e in map(json.loads, metrics.read_text().splitlines()) if e["step"] <= step]
        if dd.is_main:
            atomic_write(metrics, lambda tmp: Path(tmp).write_text("".join(json.dumps(e) + "\n" for e in history)))
    dd.barrier()
    return step, history, state.get("loop")


def start_or_resume(out: Path | None, resume: bool, model, optimizer, scheduler, record: dict, may_change: set[str],
                    dd) -> tuple[int, list[dict], dict | None]:
    """(first step, metrics so far, the saved `loop_state`): a resumed run's from its checkpoint
    in `out` (see `load`); a new run's (0, [], None), its output directory refused if it holds a
    checkpoint and emptied of an earlier run's metrics (`start_fresh`)."""
    if resume:
        if out is None:
            raise ValueError("resume needs an output directory holding the checkpoint")
        return load(out, model, optimizer, scheduler, record, may_change, dd)
    if out is not None:
        if dd.is_main:
            start_fresh(out)
        dd.barrier()
    return 0, [], None
