"""training/cli.py, the command line every train.py shares: --help lists every option, overrides
keep their meaning, a resumed run reads the corpus and tokenizer it began with, a run on the
offline fallback corpus says so everywhere, and a failed run leaves nothing --resume would take."""

import dataclasses
import hashlib
import json
import re

import pytest
import torch

from architectures import registry
from architectures.llama3.train import main as llama_main
from architectures.mixtral.train import main as mixtral_main
from architectures.utils.device import device_label, resolve_device
from training import checkpointing, cli, data, options
from training.recipes import pretraining_recipes
from training.train_config import TrainConfig

LLAMA_RECIPES = pretraining_recipes("llama3")
MIXTRAL_RECIPES = pretraining_recipes("mixtral")

# Small enough that a run with a full validation pass and a sample takes a second or two.
TINY = ["--max-steps", "1", "--batch-size", "2", "--block-size", "32", "--eval-batches", "1", "--hidden-size", "32",
        "--intermediate-size", "64", "--num-hidden-layers", "1", "--num-attention-heads", "2",
        "--num-key-value-heads", "1", "--head-dim", "16", "--max-position-embeddings", "64"]


def refusal(capsys, main, argv) -> str:
    """The one `error: ...` line with which a command line refuses argv."""
    with pytest.raises(SystemExit) as refused:
        main(argv)
    assert refused.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def help_entries(capsys, monkeypatch, main, argv) -> tuple[str, dict[str, str]]:
    """(--help's text, {option: its whole entry on one line})."""
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping inside a help text
    with pytest.raises(SystemExit) as done:
        main(argv + ["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    entries: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("  -"):
            flag = line.split()[0]
            entries[flag] = line.strip()
        elif line.startswith("    ") and entries:  # an entry continued on the next line
            entries[flag] += " " + line.strip()
    return text, entries


# ---------------------------------------------------------------------------- --help and overrides


@pytest.mark.parametrize("main,recipes,preset", [(llama_main, LLAMA_RECIPES, "tiny"),
                                                 (llama_main, LLAMA_RECIPES, "shakespeare"),
                                                 (mixtral_main, MIXTRAL_RECIPES, "tiny")])
def test_help_lists_every_option_with_its_type_default_and_meaning(main, recipes, preset, capsys, monkeypatch):
    text, entries = help_entries(capsys, monkeypatch, main, ["--preset", preset])
    assert {"--preset", "--out", "--resume"} <= set(entries)
    recipe = recipes[preset]
    for heading in (f"model ({type(recipe.model).__name__}):", "training loop (TrainConfig):", "data (DataConfig):"):
        assert heading in text.splitlines()
    for cfg in (recipe.model, recipe.train, recipe.data):
        meanings = options.field_meanings(type(cfg))
        for f in dataclasses.fields(cfg):
            entry, value = entries[f"--{f.name.replace('_', '-')}"], getattr(cfg, f.name)
            if f.name == "vocab_size":
                assert "--bpe-vocab-size" in entry
                continue
            assert meanings[f.name] and meanings[f.name] in entry, f.name  # the comment on the field is its meaning
            assert f"(default: {value!r})" in entry if isinstance(value, str) else f"(default: {value})" in entry
    assert "float" in entries["--lr"].split("  ")[0] and "[bool]" in entries["--compile"].split("  ")[0]


def test_help_reads_each_fields_comment_inherited_ones_too():
    from architectures.mixtral.config import MixtralConfig

    meanings = options.field_meanings(MixtralConfig)
    assert meanings["hidden_size"] == "d_model: width of the residual stream"  # declared by LlamaConfig
    assert meanings["num_experts_per_tok"].startswith("k: experts each token is routed to")
    assert options.field_meanings(TrainConfig)["grad_clip"] == "clip the global gradient norm to this (0 disables)"


def test_overrides_parse_to_the_fields_types():
    args = cli.parse(["--lr=0.5", "--max-steps", "3", "--compile", "--activation-checkpointing", "false",
                      "--head-dim", "none", "--dataset", "x.txt", "--out", "somewhere"], LLAMA_RECIPES, "llama3")
    assert (args.recipe.train.lr, args.recipe.train.max_steps) == (0.5, 3)
    assert args.recipe.train.compile is True and args.recipe.train.activation_checkpointing is False
    assert args.recipe.data.dataset == "x.txt" and str(args.out) == "somewhere" and not args.resume
    untouched = LLAMA_RECIPES["tiny"]
    assert args.recipe.train.batch_size == untouched.train.batch_size and args.recipe.model.hidden_size == 128
    assert untouched.train.lr != 0.5  # the preset itself is not modified


@pytest.mark.parametrize("argv,message", [
    (["--lr", "abc"], "--lr expects float, got 'abc'"),
    (["--max-steps", "1.5"], "--max-steps expects int, got '1.5'"),
    (["--compile", "maybe"], "--compile expects bool, got 'maybe'"),
    (["--lrr", "1"], "unknown option --lrr; valid options are --activation-checkpointing"),
    (["--max", "1"], "unknown option --max; valid options are --activation-checkpointing"),  # no abbreviations: a typo is an error
    (["--preset", "huge"], "unknown preset 'huge' for llama3; choose one of ['gpt2-124m', 'shakespeare', 'tiny']"),
    (["--vocab-size", "100"], "comes from the tokenizer; set --bpe-vocab-size instead"),
    (["--tokenizer", "word"], "--tokenizer 'word' is not one of ('bpe', 'char')"),
    (["--num-attention-heads", "3"], "hidden_size=128 is not divisible by num_attention_heads=3"),
    (["--num-attention-heads", "3", "--head-dim", "32"], "num_attention_heads=3 must be a multiple of num_key_value_heads=2"),
])
def test_bad_options_are_refused_in_one_line_before_anything_runs(argv, message, capsys, tmp_path):
    line = refusal(capsys, llama_main, argv + ["--out", str(tmp_path / "run")])
    assert message in line
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------- a run, its record and its messages


def run_args(corpus, out, *extra):
    return ["--preset", "tiny", "--dataset", str(corpus), "--out", str(out), "--bpe-vocab-size", "300", *TINY, *extra]


def test_run_says_where_the_corpus_came_from_and_when_it_trains_a_tokenizer(corpus, tmp_path, capsys):
    summary = llama_main(run_args(corpus, tmp_path / "a"))
    first = capsys.readouterr().out
    assert f"corpus: {corpus}, {len(corpus.read_text()):,} characters, from the file {corpus}" in first
    assert "tokenizer: training bpe with 300 tokens on" in first and "tokens: encoding" in first
    assert f"validation (whole split of {corpus}):" in first
    llama_main(run_args(corpus, tmp_path / "b"))
    second = capsys.readouterr().out
    assert "tokenizer: bpe with 300 tokens, from the cache" in second and "tokens: encoding" not in second
    assert summary["corpus"] == str(corpus) and summary["corpus_sha256"] == hashlib.sha256(corpus.read_bytes()).hexdigest()
    assert summary["device"] == device_label(resolve_device("auto"))


def test_offline_fallback_is_labelled_and_its_resume_online_is_refused(corpus, tmp_path, offline, monkeypatch, capsys):
    """A run made offline trains on the embedded stand-in. Its summary, checkpoint record and
    final line say so. Resumed where Tiny Shakespeare is available, it would silently switch
    corpus and tokenizer (the loss jumped from 1.64 to 6.59 when that was allowed): refused,
    naming both corpora and both tokenizers, before any file of the run is touched."""
    out = tmp_path / "run"
    argv = ["--preset", "tiny", "--out", str(out), "--tokenizer", "char", *TINY]
    summary = llama_main(argv)
    printed = capsys.readouterr()
    assert summary["corpus"] == data.FALLBACK_NAME == "embedded pydoc_data.topics (offline fallback, NOT Tiny Shakespeare)"
    assert json.loads((out / "summary.json").read_text())["corpus"] == data.FALLBACK_NAME
    assert f"validation (whole split of {data.FALLBACK_NAME})" in printed.out
    assert "falling back to the embedded corpus" in printed.err
    record = checkpointing.read_record(out)
    assert record["corpus"]["name"] == data.FALLBACK_NAME
    fallback_sha = record["corpus"]["sha256"]

    shakespeare = ("ROMEO:\nBut, soft! what light through yonder window breaks?\n\n" * 400).encode()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / data.TINYSHAKESPEARE_FILE).write_bytes(shakespeare)
    monkeypatch.setattr(data, "TINYSHAKESPEARE_SHA256", hashlib.sha256(shakespeare).hexdigest())
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "data"))
    tokenizer_before = (out / "tokenizer.json").read_bytes()
    line = refusal(capsys, llama_main, argv + ["--resume", "--max-steps", "2"])
    assert f"was trained on other data: corpus '{data.FALLBACK_NAME}' (sha256 {fallback_sha[:16]}) then, " \
           f"'tinyshakespeare' (sha256 {hashlib.sha256(shakespeare).hexdigest()[:16]}, from {tmp_path / 'data'}" in line
    assert re.search(r"tokenizer char \d+ \(sha256 \w{16}\) then, char \d+ \(sha256 \w{16}\) now", line)
    assert (out / "tokenizer.json").read_bytes() == tokenizer_before
    assert torch.load(out / checkpointing.STATE_FILE, weights_only=True)["step"] == 1


def test_corpus_too_short_for_a_block_is_refused_before_training(tmp_path, capsys):
    """Found before the first step, not at the first evaluation hundreds of steps later, and
    before the run's folder exists."""
    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be, that is the question. " * 3)
    out = tmp_path / "run"
    line = refusal(capsys, llama_main, run_args(short, out))
    assert "validation split of" in line and "block_size=32 needs at least 33" in line
    assert not out.exists()


def test_run_passes_the_familys_on_step_hook_to_the_loop(corpus, tmp_path, monkeypatch):
    """A family whose routers move a bias after every step (DeepSeek-V3) declares the hook in the
    registry; `run` hands it to the loop, which calls it after each optimizer step."""
    steps = []
    hooked = dataclasses.replace(registry.family("llama3"), on_step=lambda step, model: steps.append(step))
    monkeypatch.setitem(registry.FAMILIES, "llama3", hooked)
    cli.run("llama3", argv=run_args(corpus, tmp_path / "run", "--max-steps", "3"))
    assert steps == [1, 2, 3]


def test_overriding_the_width_derives_head_dim_again_unless_it_is_set(tmp_path):
    from training.cli import parse
    RECIPES = LLAMA_RECIPES

    out = ["--out", str(tmp_path / "run")]  # not the default runs/llama3-tiny, which may hold a real run
    assert parse(["--hidden-size", "64"] + out, RECIPES, "llama3").recipe.model.head_dim == 16  # tiny: 4 heads
    assert parse(["--hidden-size", "64", "--head-dim", "32"] + out, RECIPES, "llama3").recipe.model.head_dim == 32
    assert parse(out, RECIPES, "llama3").recipe.model.head_dim == 32
