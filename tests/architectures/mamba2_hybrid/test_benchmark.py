"""architectures/mamba2_hybrid/benchmarks/ssd.py: on tiny sizes it prints one parseable line per implementation,
the implementations agree with the recurrence before they are timed, transformers' scan called on slices
of heads is the scan called once, and bad arguments are one-line errors."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from architectures.mamba2_hybrid.benchmarks import ssd as benchmark
from architectures.mamba2_hybrid.ssd import ssd_sequential

ROOT = Path(__file__).resolve().parents[3]
TINY = ["--device", "cpu", "--batch", "2", "--seq-len", "37", "--heads", "4", "--head-dim", "3", "--state", "5",
        "--groups", "2", "--chunk", "8", "--warmup", "1", "--iters", "2"]


def parse(lines, tag):
    return [dict(kv.split("=", 1) for kv in line.split()[1:]) for line in lines if line.startswith(tag + " ")]


def test_tiny_run_prints_a_line_per_implementation_after_checking_each_against_the_recurrence(capsys):
    results = benchmark.main(TINY)
    lines = capsys.readouterr().out.splitlines()
    checks, bench = parse(lines, "bench_check"), parse(lines, "bench")
    # On the CPU chunked-compiled is off unless --compile: the recurrence, ours, transformers'.
    assert [c["impl"] for c in checks] == ["chunked", "hf-chunked"]
    for c in checks:  # fp32 arithmetic on the same inputs: only the summation order differs
        assert float(c["max_abs_diff"]) <= 1e-5 * max(float(c["max_abs_y"]), 1.0)
    assert [r["impl"] for r in bench] == [r["impl"] for r in results] == ["sequential", "chunked", "hf-chunked"]
    for r in bench:
        assert r["pass"] == "fwd+bwd" and r["seq_len"] == "37" and r["chunk"] == "8" and r["dtype"] == "fp32"
        assert float(r["ms"]) > 0 and float(r["tokens_per_s"]) > 0
    assert bench[0]["iters"] == "1" and bench[1]["iters"] == "2"  # the recurrence is timed once
    assert float(bench[1]["vs_sequential"]) > 0 and "vs_hf_chunked" in bench[1] and "tflops" not in bench[0]
    assert bench[2]["head_slices"] == "2"  # tiny: one call per group, each reading its own B and C


def test_forward_only_and_a_chosen_subset(capsys):
    results = benchmark.main(TINY + ["--no-backward", "--impls", "chunked"])
    assert [r["impl"] for r in results] == ["sequential", "chunked"]  # the baseline always runs
    assert all(r["pass"] == "fwd" for r in parse(capsys.readouterr().out.splitlines(), "bench"))


def test_transformers_scan_on_slices_of_heads_equals_one_call():
    """Slicing is how the GPU defaults fit; each slice of heads reads its own group's B and C. The same
    sums in other shapes: equal up to fp32 rounding."""
    gen = torch.Generator().manual_seed(0)
    b, T, h, p, g, n = 2, 19, 6, 3, 2, 4
    x, B, C = (torch.randn(b, T, *s, generator=gen) for s in ((h, p), (g, n), (g, n)))
    dt, A = torch.rand(b, T, h, generator=gen) * 0.5, -torch.arange(1.0, h + 1)
    scan = benchmark.hf_chunk_scan()
    whole = scan(x, dt, A, B, C, 8)
    torch.testing.assert_close(whole, ssd_sequential(x, dt, A, B, C)[0], rtol=1e-5, atol=1e-5)
    for k in (1, 3):  # divisors of h / g
        torch.testing.assert_close(benchmark.hf_sliced(scan, k)(x, dt, A, B, C, 8), whole, rtol=1e-6, atol=1e-6)


def test_gpu_defaults_call_transformers_on_slices_that_fit_an_80gb_card():
    """One (b, T/Q, Q, Q, heads, n) fp32 broadcast product of all 80 heads is 86 GB: more than the card.
    Slices of 8 heads make it 8.6 GB, within the budget of 1/8 of the card; 10 heads would not be."""
    b, T, h, g, n, p, Q = 2, 4096, 80, 1, 128, 64, 256
    product = b * T * Q * n * 4  # bytes per head
    assert h * product > 80e9
    assert benchmark.hf_heads_per_call(b, T, h, g, n, p, Q, budget=80e9 / 8) == 8
    assert 8 * product <= 80e9 / 8 < 10 * product


@pytest.mark.parametrize("argv,message", [
    (["--seq-len", "0"], "error: --seq-len must be >= 1, got 0"),
    (["--chunk", "0"], "error: --chunk must be >= 1, got 0"),
    (["--impls", "chunked,fast"], "error: unknown --impls 'fast'; choose from sequential, chunked, "
                                  "chunked-compiled, chunked-bf16-compiled, mamba-ssm, hf-chunked"),
    (["--heads", "6", "--groups", "4"], "error: --heads 6 is not divisible by --groups 4"),
    (["--dtype", "fp16"], "error: argument --dtype: invalid choice"),
])
def test_bad_arguments_are_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as refused:
        benchmark.main(["--device", "cpu"] + argv)
    err = capsys.readouterr().err.splitlines()
    assert refused.value.code == 2 and len(err) == 1 and err[0].startswith(message)


def test_the_command_line_refuses_a_bad_argument_in_one_line():
    done = subprocess.run([sys.executable, "-m", "architectures.mamba2_hybrid.benchmarks.ssd", "--device", "cpu",
                           "--chunk", "0"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == ["error: --chunk must be >= 1, got 0"]


def test_transformers_missing_is_one_line_that_says_how_to_get_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "transformers.models.mamba2", None)  # makes the import fail
    with pytest.raises(SystemExit):
        benchmark.main(TINY)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: hf-chunked needs transformers") and "[test]" in err[0]
