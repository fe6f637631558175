"""What a person at a terminal sees when a training command line is given something wrong: the
process exits non-zero with ONE line on stderr, `error: ...`, naming the offending value, and no
traceback. Run as real subprocesses, since that is what a person runs."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def run(module: str, *argv: str, cwd: Path) -> subprocess.CompletedProcess:
    """`python -m module argv` in `cwd`, offline for the Hugging Face hub whatever the network (so a
    hub name fails the same here and in CI), caching in cwd/cache unless a test's fixture set
    ZOO_CACHE_DIR; ZOO_DATA_DIR passes through as it is set."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    env.setdefault("ZOO_CACHE_DIR", str(cwd / "cache"))
    env.pop("ZOO_DEBUG", None)
    return subprocess.run([sys.executable, "-m", module, *argv], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def assert_one_line_error(proc: subprocess.CompletedProcess, *names: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for name in names:
        assert name in lines[0], (name, lines[0])


# A one-step run small enough to take about a second.
TINY = ["--max-steps", "1", "--batch-size", "2", "--block-size", "16", "--eval-batches", "1", "--hidden-size", "32",
        "--intermediate-size", "64", "--num-hidden-layers", "1", "--head-dim", "8", "--bpe-vocab-size", "270"]


def trained_run(corpus: Path, out: Path) -> None:
    """A run in `out`, trained in this process (cheaper than one more subprocess)."""
    from architectures.llama3.train import main

    main(["--dataset", str(corpus), "--out", str(out), *TINY])


NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for a torch that sees no GPU")


@pytest.mark.parametrize("argv,names", [
    (["--device", "gpu0"], ["unknown device 'gpu0'"]),
    pytest.param(["--device", "cuda"], ["device 'cuda' requested but this torch sees no CUDA GPU"], marks=NO_GPU),
    (["--checkpoint-interval", "-1"], ["checkpoint_interval must be >= 0", "-1"]),
    (["--no-such-option", "1"], ["unknown option --no-such-option; valid options are --activation-checkpointing"]),
    (["--lr", "abc"], ["--lr", "expects float, got 'abc'"]),
    (["--preset", "huge"], ["unknown preset 'huge'"]),
    (["--resume", "--out", "{tmp}/empty"], ["holds no checkpoint", "empty"]),
    (["--resume", "--out", "{tmp}/missing"], ["missing does not exist"]),
    (["--resume", "--out", "{tmp}/run"], ["was trained on other data: corpus", "then,", "now"]),
], ids=["device-gpu0", "device-cuda", "checkpoint-interval", "unknown-option", "wrong-type", "unknown-preset",
        "resume-no-checkpoint", "resume-no-directory", "resume-other-corpus"])
def test_llama3_train_refuses_bad_input_in_one_line(argv, names, corpus, tmp_path):
    (tmp_path / "empty").mkdir()
    if "{tmp}/run" in argv:
        trained_run(corpus, tmp_path / "run")
        corpus.write_text(corpus.read_text().replace("question", "answer"))  # the corpus changed since
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    proc = run("architectures.llama3.train", "--dataset", str(corpus), *TINY, *argv, cwd=tmp_path)
    assert_one_line_error(proc, *names)


def test_mixtral_train_refuses_bad_input_in_one_line(corpus, tmp_path):
    proc = run("architectures.mixtral.train", "--dataset", str(corpus), "--num-local-experts", "many", cwd=tmp_path)
    assert_one_line_error(proc, "--num-local-experts", "expects int, got 'many'")


def test_benchmark_refuses_bad_input_in_one_line(tmp_path):
    proc = run("training.benchmarks.throughput", "--arch", "mixtral", "--device", "cpu", cwd=tmp_path)
    assert_one_line_error(proc, "mixtral has no gpt2-124m preset", "'tiny'")
