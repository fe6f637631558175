"""What the inference commands do with the options they take: throughput's --kv-dtype, the windows of
the quantized-weights benchmark (the block size the checkpoint was trained with), quantized_kv's exit
status when a part fails, inference.memory's default preset for every family, and every command's
--help (each option explained, each family's presets listed where one is taken). The one-line errors
of bad options are in tests/inference/test_cli_errors.py."""

import argparse
import importlib

import pytest

from architectures import registry

BENCH = ["--device", "cpu", "--preset", "tiny", "--num-prompts", "2", "--min-len", "4", "--max-len", "8",
         "--new-tokens", "2"]
TEXT = "".join(f"Line {i}: to be, or not to be, that is the question.\n" for i in range(200))


# ---- --kv-dtype of the throughput benchmark --------------------------------------------------------

def test_benchmark_stores_the_zoo_engines_kv_as_asked_and_leaves_hf_out(capsys):
    from inference.benchmarks.throughput import main as benchmark_main

    results = benchmark_main([*BENCH, "--kv-dtype", "int8"])
    assert list(results) == ["naive", "paged"], "hf keeps its own cache: left out of the default engines"
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("bench ")]
    assert len(lines) == 2 and all(" kv_dtype=int8 " in line for line in lines)
    assert results["paged"]["outputs"] == results["naive"]["outputs"], "fp32, greedy: both int8 caches agree"


def test_benchmark_runs_int4_without_cuda_graphs():
    from inference.benchmarks.throughput import choose_engines, parse_args

    args, _ = parse_args([*BENCH, "--kv-dtype", "int4"])
    assert choose_engines(args, cuda=True) == ["naive", "paged"], "no hf (own cache), no paged-graphs (int4)"
    args, _ = parse_args([*BENCH, "--kv-dtype", "int4", "--engines", "paged,paged-graphs"])
    with pytest.raises(ValueError, match="--kv-dtype int4 runs without CUDA graphs"):
        choose_engines(args, cuda=True)


# ---- the quantized-weights benchmark's windows -------------------------------------------------------

def test_quantized_weights_scores_in_the_block_size_the_checkpoint_was_trained_with(sft_checkpoint, chat_base,
                                                                                    monkeypatch, tmp_path, capsys):
    from inference.benchmarks.quantized_weights import main as weights_main

    monkeypatch.setenv("ZOO_CACHE_DIR", str(tmp_path))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    rows = weights_main(["--checkpoint", str(sft_checkpoint), "--corpus", str(corpus), "--device", "cpu"])
    first = capsys.readouterr().out.splitlines()[0]
    assert first == f"block size 64: the block size {sft_checkpoint} was trained with"  # the SFT run's --block-size
    assert [r["format"] for r in rows] == ["none", "int8", "int4", "nf4", "nf4 + double quant"]
    # No training record (the base SFT started from, as a download would be): the model's whole context.
    weights_main(["--checkpoint", str(chat_base), "--corpus", str(corpus), "--device", "cpu", "--group-size", "32"])
    first = capsys.readouterr().out.splitlines()[0]
    assert first == f"block size 128: the model's max_position_embeddings ({chat_base} has no training record)"


# ---- quantized_kv: a part that fails ---------------------------------------------------------------

def test_quantized_kv_ends_with_a_failure_exit_when_a_part_fails(monkeypatch, capsys):
    from inference.benchmarks import quantized_kv

    def broken(args, device):
        raise RuntimeError("the kernel crashed")
    monkeypatch.setattr(quantized_kv, "part_kernel", broken)
    with pytest.raises(SystemExit) as exit:
        quantized_kv.main(["--quick", "--device", "cpu", "--parts", "kernel"])
    assert exit.value.code == 1, "a failure is not a result"
    captured = capsys.readouterr()
    assert "| part | error |" in captured.out, "the table still comes"
    assert captured.err.splitlines()[-1] == ("bench_quantized_kv: 1 failed: part=kernel "
                                             "error=RuntimeError:_the_kernel_crashed")


# ---- inference.memory: every family's default preset -------------------------------------------------

@pytest.mark.parametrize("family", registry.language_models())
def test_memory_runs_every_family_with_its_default_preset(family, capsys):
    from inference.command_checks import default_preset, family_presets
    from inference.memory import main as memory_main

    memory_main(["--family", family])
    preset = default_preset(family, "llama-3.2-1b")
    assert preset in family_presets(family) and capsys.readouterr().out.startswith(f"{preset}: ")


# ---- --help of every command ----------------------------------------------------------------------

COMMANDS = ["inference.generate", "inference.memory", "inference.benchmarks.throughput",
            "inference.benchmarks.quantized_kv", "inference.benchmarks.quantized_weights",
            "inference.benchmarks.paged_decode"]


@pytest.mark.parametrize("module", COMMANDS)
def test_help_explains_every_option_and_lists_the_presets(module, monkeypatch, capsys):
    from inference.command_checks import family_presets

    parsers = []
    parse = argparse.ArgumentParser.parse_known_args

    def spy(self, args=None, namespace=None):
        parsers.append(self)
        return parse(self, args, namespace)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", spy)
    with pytest.raises(SystemExit) as exit:
        importlib.import_module(module).main(["--help"])
    assert exit.value.code == 0
    options = {o: a for a in parsers[0]._actions for o in a.option_strings}
    assert [o for o, a in options.items() if len((a.help or "").split()) < 3] == [], "options without help"
    text = " ".join(capsys.readouterr().out.split())
    if "--preset" in options:
        families = registry.language_models() if "--family" in options else ["llama3"]
        missing = [p for f in families for p in family_presets(f) if p not in text]
        assert missing == [], f"--help should list the presets {missing}"
