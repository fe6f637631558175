"""Every mistake on a fundamentals command line is one `error: ...` line, exit status 2, before any work.

One subprocess per script runs the mistake a user met (the command as typed, with Python's own
start-up and exit status); the other cases call `main` in-process (`command_error`), which is
the same code without paying torch's import again. Each failing case passes an --out that must
still not exist afterwards: the check came before any work.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from fundamentals.autograd import train as autograd_train
from fundamentals.cli import build_parser, default_out, parse_config, ranges
from fundamentals.cnn import train as cnn_train
from fundamentals.nn import train as nn_train
from fundamentals.rnn import classify as rnn_classify
from fundamentals.rnn import train as rnn_train
from fundamentals.vae import train as vae_train
from training.options import field_meanings

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = {"autograd.train": autograd_train, "nn.train": nn_train, "cnn.train": cnn_train,
           "rnn.train": rnn_train, "rnn.classify": rnn_classify, "vae.train": vae_train}


def see_help(name: str) -> str:
    return f" (see python -m fundamentals.{name} --help)"


# The mistakes users met, each run as its own command. {out} is a fresh folder under tmp_path.
MET = {
    "autograd.train": (["--steps", "-3", "--out", "{out}"],
                       "error: --steps must be at least 1, got -3" + see_help("autograd.train")),
    "nn.train": (["--out", "README.md"],
                 "error: --out README.md is a file; pass a directory (it is created if missing)"),
    "cnn.train": (["--batch-size", "0", "--out", "{out}"],
                  "error: --batch-size must be at least 1, got 0" + see_help("cnn.train")),
    "rnn.train": (["--lr", "nan", "--out", "{out}"],
                  "error: --lr must be a finite number above 0, got nan" + see_help("rnn.train")),
    "rnn.classify": (["--preset", "huge", "--out", "{out}"],
                     "error: unknown preset 'huge'; choose one of default, tiny" + see_help("rnn.classify")),
    "vae.train": (["--epochs", "0", "--out", "{out}"],
                  "error: --epochs must be at least 1, got 0" + see_help("vae.train")),
}


@pytest.fixture(scope="module")
def met_runs(tmp_path_factory):
    """All six commands started at once (each mostly waits on importing torch), then collected."""
    tmp = tmp_path_factory.mktemp("out")
    procs = {}
    for name, (argv, _) in MET.items():
        argv = [a.format(out=tmp / name) for a in argv]
        procs[name] = subprocess.Popen([sys.executable, "-m", f"fundamentals.{name}", *argv], cwd=ROOT, text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    done = {name: (*p.communicate(timeout=120), p.returncode) for name, p in procs.items()}
    return tmp, done


@pytest.mark.parametrize("name", list(MET))
def test_the_mistake_users_met_is_one_error_line_and_exit_2(name, met_runs):
    tmp, done = met_runs
    stdout, stderr, code = done[name]
    assert "Traceback" not in stderr and stdout == ""
    assert (code, stderr.splitlines()) == (2, [MET[name][1]])
    assert not (tmp / name).exists()


def outside(r, tp) -> list[str]:
    """Values just outside range `r` of a field of type `tp`, as typed on a command line."""
    step = 1 if tp is int else 0.5
    values = [r.low if r.low_open else r.low - step]
    if r.high != float("inf"):
        values.append(r.high if r.high_open else r.high + step)
    return [str(int(v)) if tp is int else str(v) for v in values] + (["nan", "inf", "-inf"] if tp is float else [])


def range_cases():
    for name, script in SCRIPTS.items():
        cls = type(next(iter(script.PRESETS.values())))
        hints = typing.get_type_hints(cls)
        for field, r in ranges(cls).items():
            for text in outside(r, hints[field]):
                yield pytest.param(name, field, text, id=f"{name}--{field}={text}")


@pytest.mark.parametrize("name, field, text", list(range_cases()))
def test_a_number_outside_its_range_names_the_option_and_the_range(name, field, text, tmp_path, command_error):
    flag = "--" + field.replace("_", "-")
    line = command_error(SCRIPTS[name].main, [flag, text, "--out", str(tmp_path / "run")])
    r = ranges(type(next(iter(SCRIPTS[name].PRESETS.values()))))[field]
    assert line.startswith(f"error: {flag} must be ") and f"{r}, got " in line, line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_every_number_field_has_a_range_and_every_field_a_meaning(name):
    cls = type(next(iter(SCRIPTS[name].PRESETS.values())))
    hints = typing.get_type_hints(cls)
    numbers = {f.name for f in dataclasses.fields(cls) if hints[f.name] in (int, float)}
    assert numbers <= set(ranges(cls)), numbers - set(ranges(cls))
    meanings = field_meanings(cls)
    assert all(meanings.get(f.name) for f in dataclasses.fields(cls)), [f.name for f in dataclasses.fields(cls)
                                                                         if not meanings.get(f.name)]


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_help_gives_every_option_a_meaning_and_lists_the_presets(name, capsys):
    with pytest.raises(SystemExit) as exit:
        SCRIPTS[name].main(["--help"])
    assert exit.value.code == 0
    text = capsys.readouterr().out
    presets = SCRIPTS[name].PRESETS
    assert all(f"\n  {preset} " in text for preset in presets), text
    parser = build_parser(presets, f"python -m fundamentals.{name}", "doc", next(iter(presets)))
    assert all(a.help and a.help[0] not in " ;(" for a in parser._actions), text


NEWCOMER = [  # (script, argv, the exact line)
    ("nn.train", ["--preset", "big"], "error: unknown preset 'big'; choose one of default, tiny"),
    ("nn.train", ["--lr", "fast"], "error: --lr expects float, got 'fast'"),
    ("nn.train", ["--lr=fast"], "error: --lr expects float, got 'fast'"),
    ("nn.train", ["--epochs", "2.5"], "error: --epochs expects int, got '2.5'"),
    ("nn.train", ["--lr", "0"], "error: --lr must be a finite number above 0, got 0.0"),
    ("nn.train", ["--lr", "-0.1"], "error: --lr must be a finite number above 0, got -0.1"),
    ("nn.train", ["--lr", "inf"], "error: --lr must be a finite number above 0, got inf"),
    ("nn.train", ["--lr", "-1e-3"], "error: --lr must be a finite number above 0, got -0.001"),  # not an option
    ("nn.train", ["--lr"], "error: argument --lr: expected one argument"),
    ("nn.train", ["--preset"], "error: argument --preset: expected one argument"),
    ("nn.train", ["tiny"], "error: expected --option value, got 'tiny'"),
    ("nn.train", ["--dropout", "1"], "error: --dropout must be a finite number at least 0 and below 1, got 1.0"),
    ("nn.train", ["--optimizer", "adam"], "error: --optimizer 'adam' is not one of 'adamw', 'sgd'"),
    ("cnn.train", ["--shift", "8"], "error: --shift must be between 0 and 7, got 8"),
    ("rnn.train", ["--cell", "gru"], "error: --cell 'gru' is not one of 'ours', 'torch'"),
    ("rnn.classify", ["--pool", "max"], "error: --pool 'max' is not one of 'last', 'mean'"),
    ("rnn.classify", ["--speakers", "1"], "error: --speakers must be at least 2, got 1"),
    ("rnn.classify", ["--test-fraction", "1"],
     "error: --test-fraction must be a finite number above 0 and below 1, got 1.0"),
    ("vae.train", ["--seed", "-1"], "error: --seed must be between 0 and 18446744073709551615, got -1"),
]


@pytest.mark.parametrize("name, argv, line", NEWCOMER, ids=[f"{n} {' '.join(a)}" for n, a, _ in NEWCOMER])
def test_a_newcomers_mistake_is_one_line(name, argv, line, tmp_path, command_error):
    got = command_error(SCRIPTS[name].main, argv + ["--out", str(tmp_path / "run")])
    assert got == line + see_help(name)
    assert not (tmp_path / "run").exists()


def test_an_unknown_option_lists_the_valid_ones(command_error):
    line = command_error(nn_train.main, ["--epoch", "3"])
    assert line.startswith("error: unknown option --epoch; valid options are --batch-size, --dropout, --epochs, ")


def test_out_must_be_a_directory_that_holds_no_finished_run(tmp_path, command_error):
    (tmp_path / "notes.txt").write_text("")
    assert command_error(cnn_train.main, ["--out", str(tmp_path / "notes.txt" / "run")]) == (
        f"error: --out {tmp_path}/notes.txt/run lies under {tmp_path}/notes.txt, a file; "
        "pass a directory (it is created if missing)")
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "summary.json").write_text("{}")
    assert command_error(vae_train.main, ["--out", str(tmp_path / "done")]) == (
        f"error: {tmp_path}/done already holds a finished run (summary.json); "
        "pass --overwrite to replace it, or choose another --out")
    cfg, out = parse_config(["--out", str(tmp_path / "done"), "--overwrite"], vae_train.PRESETS, "prog", "doc")
    assert out == tmp_path / "done" and cfg == vae_train.PRESETS["default"]


def test_the_default_out_is_a_folder_per_script_and_preset_under_runs():
    assert default_out("python -m fundamentals.cnn.train", "small") == "runs/fundamentals-cnn-small"
    assert default_out("python -m fundamentals.rnn.classify", "tiny") == "runs/fundamentals-rnn-classify-tiny"


def test_an_out_that_cannot_be_written_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, command_error):
    """A read-only file system, as the OS raises it (root's chmod would not refuse the write)."""
    import errno
    import tempfile

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    out = tmp_path / "run"
    line = command_error(SCRIPTS["nn.train"].main, ["--out", str(out)])
    assert line == (f"error: --out {out} cannot be written: Read-only file system; pass a --out in a folder you can "
                    f"write (it is created if missing)")
    assert not out.exists()
