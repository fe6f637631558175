"""training/benchmarks/throughput.py: it runs the real loop and reports, and the baseline's FLOPs formula is right."""

import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from architectures.llama3 import PRESETS, Llama3, LlamaConfig
from training.benchmarks import throughput as benchmark


def test_benchmark_runs_the_loop_and_prints_one_line(capsys):
    result = benchmark.main(["--preset", "tiny", "--batch-size", "4", "--seq-len", "32", "--steps", "2",
                             "--warmup", "1", "--device", "cpu"])
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("train_benchmark ")]
    assert len(line) == 1
    fields = dict(kv.split("=") for kv in line[0].split()[1:])
    assert fields["arch"] == "llama3" and fields["batch"] == "4" and fields["seq"] == "32"
    assert float(fields["params_M"]) == round(Llama3(PRESETS["tiny"]).num_parameters() / 1e6, 1)
    assert result["tokens_per_s"] > 0 and result["step_ms"] > 0
    assert 0 <= result["data_fraction"] < 1
    assert "mfu" not in result  # no MFU without a GPU whose bf16 peak is known


def test_gpt2_baseline_flops_formula_matches_counted_matmuls():
    """As for Llama 3 (tests/architectures/llama3/test_flops.py): every matmul of a forward+backward
    counted, attention through SDPA's math backend; the formula charges the causal fraction."""
    _, build, flops_per_token = benchmark.gpt2_baseline()
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      max_position_embeddings=64)
    B, T = 2, 32
    model = build(cfg)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(torch.randint(0, 64, (B, T))).sum().backward()
    D, L, V, H = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size, cfg.num_attention_heads
    weights = 12 * L * D * D + V * D  # 4 D^2 attention + 8 D^2 MLP per layer, and the head
    full_attention = counter.get_total_flops() - 6 * weights * B * T
    assert full_attention == 3 * L * (2 * 2 * B * H * T * T * (D // H))
    assert flops_per_token(cfg, T) * B * T == pytest.approx(6 * weights * B * T + full_attention * (T + 1) / (2 * T))


@pytest.mark.parametrize("argv,message", [
    (["--arch", "gpt3"], "invalid choice"),
    (["--preset", "huge"], "unknown llama3 preset 'huge'"),
    (["--steps", "15", "--warmup", "10"], "--steps must be a multiple of --warmup"),
])
def test_bad_arguments_are_refused_clearly(argv, message, capsys):
    with pytest.raises(SystemExit) as refused:
        benchmark.main(argv + ["--device", "cpu"])
    assert message in str(refused.value) + capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for machines without a GPU")
def test_data_on_device_without_a_gpu_is_refused(capsys):
    with pytest.raises(SystemExit):
        benchmark.main(["--preset", "tiny", "--data-on-device", "--device", "cpu"])
    assert "--data-on-device needs a CUDA GPU" in capsys.readouterr().err


def test_any_registered_family_is_timed_with_the_loss_its_train_script_trains_with(capsys):
    from architectures.mixtral.losses import moe_lm_loss

    assert benchmark.architecture("mixtral")[3] is moe_lm_loss  # its auxiliary losses are part of the step
    result = benchmark.main(["--arch", "mixtral", "--preset", "tiny", "--batch-size", "2", "--seq-len", "16",
                             "--steps", "1", "--warmup", "1", "--device", "cpu"])
    assert result["arch"] == "mixtral" and result["tokens_per_s"] > 0
    assert capsys.readouterr().out.count("train_benchmark arch=mixtral preset=tiny ") == 1


def test_baseline_without_transformers_says_it_needs_the_test_extra(monkeypatch, capsys):
    """After `pip install -e .` (no test extra) only the baseline needs transformers: asking for it
    is one line that says how to get it; every other --arch runs."""
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(SystemExit) as refused:
        benchmark.main(["--arch", "gpt2-transformers", "--device", "cpu"])
    lines = capsys.readouterr().err.splitlines()
    assert refused.value.code == 2 and len(lines) == 1
    assert lines[0].startswith("error: --arch gpt2-transformers") and "pip install -e '.[test]'" in lines[0]
    assert benchmark.main(["--preset", "tiny", "--batch-size", "2", "--seq-len", "16", "--steps", "1", "--warmup", "1",
                           "--device", "cpu"])["arch"] == "llama3"
