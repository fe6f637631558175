"""Mistakes a new user made, each refused in one `error: ...` line that names the input, with exit
status 2, no traceback, and before any model is trained: an --out that cannot be written, a corpus
or a data file that is not what it should be, a hub name while offline, a quick start that fell
back to the offline corpus, a --resume of other settings or of a partial checkpoint, a NaN option,
an empty sample prompt; and every method's --help explains every option.

One check per command runs as a real subprocess (tests/training/test_cli_errors.py's `run`), the
rest call `main(argv)` in this process (the `command_error` fixture): a subprocess costs seconds of
imports. None of them reads Tiny Shakespeare, so ZOO_DATA_DIR may be set or not."""

import errno
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest

from architectures.llama3.train import main as llama_main
from tests.training.test_cli import help_entries
from tests.training.test_cli_errors import TINY, assert_one_line_error, run, trained_run
from training import checkpointing, data
from training.distillation.train import main as distill_main
from training.dpo.train import main as dpo_main
from training.grpo.train import main as grpo_main
from training.lora.train import main as lora_main
from training.sft.train import main as sft_main

# A fine-tuning run of a step or two, with the built-in arithmetic task alone (no Tiny Shakespeare).
FINE_TUNE = ["--max-steps", "1", "--batch-size", "2", "--block-size", "64", "--eval-batches", "1",
             "--arithmetic-examples", "12", "--speaker-examples", "0", "--eval-examples", "2", "--val-conversations", "4"]


# ---------------------------------------------------------------------------- 1. --out cannot be written


def test_sft_out_under_a_file_is_refused_in_one_line(tmp_path):
    (tmp_path / "afile").write_text("")
    proc = run("training.sft.train", "--out", "afile/run", cwd=tmp_path)
    assert_one_line_error(proc, "--out afile/run cannot be created", "afile is a file")


def test_pretraining_out_under_a_file_is_refused_before_the_corpus_is_read(tmp_path, command_error):
    (tmp_path / "afile").write_text("")
    line = command_error(llama_main, ["--dataset", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "afile/run")])
    assert f"--out {tmp_path / 'afile/run'} cannot be created" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a folder of mode 0o500 anyway; the refusal itself "
                    "is checked for root too, with the OS errors simulated (test_an_os_error_while_probing_out...)")
def test_out_in_a_read_only_folder_is_refused(tmp_path, command_error):
    (tmp_path / "ro").mkdir(mode=0o500)
    line = command_error(llama_main, ["--out", str(tmp_path / "ro/run")])
    assert "cannot be written: Permission denied" in line


@pytest.mark.parametrize("where", ["mkdir", "mkstemp"])
def test_an_os_error_while_probing_out_is_refused_and_leaves_nothing(where, tmp_path, monkeypatch, command_error):
    """A read-only file system (EROFS) or a denied folder (EACCES), as they are raised, not as root's
    chmod would fake them."""
    def refuse(*args, **kwargs):
        code = errno.EROFS if where == "mkstemp" else errno.EACCES
        raise OSError(code, os.strerror(code), str(tmp_path / "a"))

    monkeypatch.setattr(Path, "mkdir", refuse) if where == "mkdir" else monkeypatch.setattr(tempfile, "mkstemp", refuse)
    out = tmp_path / "a" / "run"
    line = command_error(sft_main, ["--out", str(out)])
    assert f"--out {out} cannot be written: {os.strerror(errno.EROFS if where == 'mkstemp' else errno.EACCES)}" in line
    monkeypatch.undo()
    assert not (tmp_path / "a").exists()


# ---------------------------------------------------------------------------- 2. a corpus that is not UTF-8 text


def test_pretraining_on_a_binary_txt_file_is_refused_in_one_line(tmp_path):
    (tmp_path / "binary.txt").write_bytes(bytes(range(256)) * 4)
    proc = run("architectures.llama3.train", "--dataset", "binary.txt", "--out", "run", cwd=tmp_path)
    assert_one_line_error(proc, "corpus file binary.txt is not UTF-8 text", "must be UTF-8 text")


@pytest.mark.parametrize("name,content,names", [
    ("corpus.txt", b"", ["corpus.txt is empty"]),
    ("corpus.jsonl", b"\x89PNG\r\n\x1a\n\x00\x00", ["line 1 is not UTF-8 text"]),
    ("corpus.jsonl", b'{"text": "one"}\n{"body": "two"}\n', ["line 2 has no column 'text'", "['body']"]),
    ("corpus.jsonl", b'{"text": "one"}\n\n{"text": 2}\n', ["line 3: column 'text' holds a int"]),
], ids=["empty-txt", "binary-jsonl", "no-text-column", "text-not-a-string"])
def test_pretraining_on_a_bad_corpus_file_names_it_and_the_line(name, content, names, tmp_path, command_error):
    (tmp_path / name).write_bytes(content)
    line = command_error(llama_main, ["--dataset", str(tmp_path / name), "--out", str(tmp_path / "run")])
    assert str(tmp_path / name) in line and all(n in line for n in names), line


# ---------------------------------------------------------------------------- 3. SFT/DPO data files


def test_dpo_on_an_empty_file_is_refused_in_one_line(tmp_path):
    (tmp_path / "prefs.jsonl").write_text("")
    proc = run("training.dpo.train", "--dataset", "prefs.jsonl", "--out", "run", cwd=tmp_path)
    assert_one_line_error(proc, "prefs.jsonl is empty", "'prompt'", "'chosen' and 'rejected'")


BAD_FILES = [
    ("data.jsonl", b"", ["data.jsonl is empty; expected one JSON object per line"]),
    ("data.jsonl", b"\x89PNG\r\n\x1a\n\x00", ["data.jsonl line 1 is not UTF-8 text"]),
    ("data.jsonl", b"{}\nwhat is this\n", ["data.jsonl line 2 is not JSON"]),
    ("data.jsonl", b'{}\n["a list"]\n', ["data.jsonl line 2 is a JSON list, not an object"]),
    ("data.json", b'[{}, 3]', ["data.json item 1 is a JSON number, not an object"]),
    ("data.json", b'[{"a": 1},\n {"a": }]', ["data.json line 2 is not JSON"]),
]
SFT_ROWS = [
    (b'{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}\n{"text": "x"}\n',
     ["line 2 has columns ['text']", "'messages'", "'conversations'", "'instruction'"]),
    (b'{"messages": "Hi"}\n', ["line 1: 'messages' must be a non-empty list"]),
    (b'{"messages": [{"role": "user", "content": "Hi"}]}\n', ["line 1 has no assistant turn"]),
    (b'{"conversations": [{"from": "bot", "value": "Hi"}]}\n', ["line 1: ShareGPT role 'bot'"]),
]
DPO_ROWS = [
    (b'{"prompt": "1 + 1?", "chosen": "2"}\n', ["line 1 has columns ['chosen', 'prompt']", "missing ['rejected']"]),
    (b'{"prompt": "1 + 1?", "chosen": "2", "rejected": 3}\n', ["line 1: rejected must be a string"]),
    (b'{"prompt": 5, "chosen": "2", "rejected": "3"}\n', ["line 1: prompt must be a string"]),
]


@pytest.mark.parametrize("main,name,content,names", [(sft_main, *c) for c in BAD_FILES]
                         + [(dpo_main, *c) for c in BAD_FILES]
                         + [(sft_main, "data.jsonl", *c) for c in SFT_ROWS]
                         + [(dpo_main, "data.jsonl", *c) for c in DPO_ROWS],
                         ids=[f"{m}-{i}" for m, rows in (("sft", BAD_FILES), ("dpo", BAD_FILES), ("sft-row", SFT_ROWS),
                                                         ("dpo-row", DPO_ROWS)) for i in range(len(rows))])
def test_a_bad_data_file_names_the_file_and_the_line_before_any_base_is_made(main, name, content, names, tmp_path,
                                                                              monkeypatch, command_error):
    monkeypatch.chdir(tmp_path)  # a base made by mistake would land in tmp_path/runs
    (tmp_path / name).write_bytes(content)
    line = command_error(main, ["--dataset", str(tmp_path / name), "--out", str(tmp_path / "run")])
    assert all(n in line for n in names), line
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------- 4. a hub name while offline


def test_pretraining_on_a_hub_name_while_offline_is_refused_in_one_line(tmp_path):
    proc = run("architectures.llama3.train", "--dataset", "someuser/somedata", "--out", "run", cwd=tmp_path)
    assert_one_line_error(proc, "--dataset 'someuser/somedata'", "could not be fetched (offline, or no such dataset",
                          "local .json/.jsonl file")


@pytest.mark.parametrize("main", [sft_main, dpo_main])
def test_fine_tuning_on_a_hub_name_while_offline_is_refused_before_any_base_is_made(main, tmp_path, monkeypatch,
                                                                                   command_error):
    import datasets  # a dependency of the zoo (pyproject.toml): imported, never skipped

    def offline(name, **kwargs):  # what `datasets` raises with HF_HUB_OFFLINE=1
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.chdir(tmp_path)
    line = command_error(main, ["--dataset", "someuser/somedata", "--out", str(tmp_path / "run")])
    assert "--dataset 'someuser/somedata'" in line and "could not be fetched (offline" in line
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------- 5. the quick start offline


def test_an_offline_quick_start_writes_beside_the_default_base_which_no_method_takes(corpus, offline, tmp_path,
                                                                                    monkeypatch, capsys, command_error):
    monkeypatch.chdir(tmp_path)
    llama_main(["--tokenizer", "char", *TINY])
    assert "runs/llama3-tiny-offline-fallback, not runs/llama3-tiny" in capsys.readouterr().out
    fallback = tmp_path / "runs/llama3-tiny-offline-fallback"
    assert checkpointing.read_record(fallback)["corpus"]["name"] == data.FALLBACK_NAME
    assert not (tmp_path / "runs/llama3-tiny").exists()

    # Still offline, a method's default base would be the quick start, trained on the stand-in: refused.
    line = command_error(sft_main, ["--out", str(tmp_path / "sft")])
    assert "--base: the default, runs/llama3-tiny, does not exist yet" in line and "ZOO_DATA_DIR" in line
    assert not (tmp_path / "runs/llama3-tiny").exists()

    # A quick start made on the stand-in by an older zoo, where the default base belongs: refused too.
    shutil.copytree(fallback, tmp_path / "runs/llama3-tiny")
    line = command_error(sft_main, ["--out", str(tmp_path / "sft")])
    assert "runs/llama3-tiny, was trained on the offline stand-in corpus" in line and "--base" in line
    (tmp_path / "runs/llama3-tiny/summary.json").unlink()  # the training record says it as well
    assert "offline stand-in" in command_error(distill_main, ["--out", str(tmp_path / "d")])


# ---------------------------------------------------------------------------- 6, 7. --resume


def test_sft_resume_with_another_preset_is_refused_before_a_base_is_trained(chat_base, corpus, tmp_path, monkeypatch,
                                                                           command_error):
    monkeypatch.chdir(tmp_path)
    sft_main(["--base", str(chat_base), "--out", str(tmp_path / "sft-tiny"), *FINE_TUNE])
    line = command_error(sft_main, ["--preset", "shakespeare", "--resume", "--out", str(tmp_path / "sft-tiny")])
    assert f"the checkpoint in {tmp_path / 'sft-tiny'} was made with a different configuration" in line
    assert "train.batch_size: checkpoint 2 vs now 64" in line
    assert not (tmp_path / "runs").exists()  # no llama3-shakespeare base was trained


def test_lora_resume_without_its_adapter_config_is_refused(chat_base, corpus, tmp_path, command_error):
    out = tmp_path / "lora"
    lora_main(["--base", str(chat_base), "--out", str(out), *FINE_TUNE])
    (out / "adapter_config.json").unlink()
    line = command_error(lora_main, ["--base", str(chat_base), "--out", str(out), "--resume", *FINE_TUNE])
    assert f"the checkpoint in {out} is missing adapter_config.json" in line and "cannot be resumed" in line


def test_resume_of_a_checkpoint_missing_a_file_it_was_saved_with_is_refused(corpus, tmp_path, command_error):
    trained_run(corpus, tmp_path / "run")
    (tmp_path / "run/model.safetensors").unlink()
    line = command_error(llama_main, ["--dataset", str(corpus), "--out", str(tmp_path / "run"), "--resume", *TINY])
    assert "is missing model.safetensors, so it is partial and cannot be resumed" in line


# ---------------------------------------------------------------------------- 8. NaN and out-of-range options


def test_lora_alpha_nan_is_refused_in_one_line(tmp_path):
    proc = run("training.lora.train", "--alpha", "nan", "--out", "run", cwd=tmp_path)
    assert_one_line_error(proc, "--alpha must be a finite number > 0", "got nan")


def test_grpo_clip_eps_nan_is_refused_in_one_line(tmp_path):
    proc = run("training.grpo.train", "--clip-eps", "nan", "--out", "run", cwd=tmp_path)
    assert_one_line_error(proc, "--clip-eps must be a finite number > 0", "got nan")


@pytest.mark.parametrize("main,flag,value,message", [
    (lora_main, "--alpha", "inf", "--alpha must be a finite number > 0"),
    (lora_main, "--alpha", "0", "--alpha must be a finite number > 0"),
    (lora_main, "--lora-dropout", "nan", "--lora-dropout must be a number in [0, 1)"),
    (lora_main, "--r", "0", "rank r must be an integer >= 1"),
    (sft_main, "--chat-format", "chatml", "--chat-format 'chatml' is not one of 'auto', 'zoo', 'llama3'"),
    (dpo_main, "--beta", "nan", "--beta must be a finite number > 0"),
    (dpo_main, "--beta", "inf", "--beta must be a finite number > 0"),
    (dpo_main, "--label-smoothing", "nan", "--label-smoothing must be a number in [0, 0.5)"),
    (dpo_main, "--rpo-alpha", "nan", "--rpo-alpha must be a finite number >= 0"),
    (dpo_main, "--lora-r", "0", "--lora-r must be an integer >= 1"),
    (grpo_main, "--temperature", "inf", "--temperature must be a finite number > 0"),
    (grpo_main, "--kl-coef", "nan", "--kl-coef must be a finite number >= 0"),
    (grpo_main, "--format-reward", "nan", "--format-reward must be a finite number"),
    (grpo_main, "--group-size", "3", "does not divide into groups of --group-size 3"),
    (distill_main, "--temperature", "nan", "--temperature nan must be a finite number > 0"),
    (distill_main, "--sample-temperature", "nan", "--sample-temperature must be a finite number >= 0"),
    (distill_main, "--alpha", "nan", "--alpha nan must be in [0, 1]"),
    (distill_main, "--beta", "nan", "--beta nan must be in [0, 1]"),
    (distill_main, "--on-policy", "inf", "--on-policy inf is a fraction of batches"),
])
def test_a_method_option_out_of_range_is_refused_before_any_work(main, flag, value, message, tmp_path, monkeypatch,
                                                                 command_error):
    monkeypatch.chdir(tmp_path)
    line = command_error(main, [flag, value, "--out", str(tmp_path / "run")])
    assert message in line and value in line, line
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------- 9. an empty sample prompt


def test_distillation_empty_sample_prompt_is_refused_in_one_line(tmp_path):
    proc = run("training.distillation.train", "--sample-prompt", "", "--out", "run", cwd=tmp_path)
    assert_one_line_error(proc, "--sample-prompt is empty", "at least one token")


def test_pretraining_empty_sample_prompt_is_refused_before_the_corpus_is_read(tmp_path, command_error):
    line = command_error(llama_main, ["--sample-prompt", "", "--dataset", str(tmp_path / "missing.txt"),
                                      "--out", str(tmp_path / "run")])
    assert "--sample-prompt is empty" in line


# ---------------------------------------------------------------------------- 10. --help


def family_mains():
    from architectures import registry

    return [__import__(f"architectures.{name}.train", fromlist=["main"]).main for name in registry.FAMILIES]


@pytest.mark.parametrize("main", [sft_main, lora_main, dpo_main, grpo_main, distill_main, *family_mains()])
def test_help_explains_every_option_and_lists_the_presets(main, capsys, monkeypatch):
    text, entries = help_entries(capsys, monkeypatch, main, [])
    presets = entries["--preset"].split()[1].strip("{}").split(",")
    description = " ".join(text.split("options:")[0].split())
    assert "Presets: " in description and all(p in description for p in presets), description
    for flag, entry in entries.items():
        meaning = INVOCATION.sub("", entry).split("(default:")[0]
        assert len(meaning.split()) >= 2, (flag, entry)


# An entry of --help starts with the option and its metavar: a type name, [bool], {choices}, DIR or -.
TYPE = r"(?:int|float|str|bool|dict|list|None)"
INVOCATION = re.compile(rf"^(?:-h, --help|--[\w-]+)(?: (?:\[bool\]|\{{[^}}]*\}}|DIR|-|{TYPE}(?:\|{TYPE})*)(?= ))?")


# ---------------------------------------------------------------------------- the loop's settings


@pytest.mark.parametrize("flags,line", [
    (["--lr", "-1"], "--lr must be a finite number > 0 (the peak learning rate), got -1.0"),
    (["--lr", "nan"], "--lr must be a finite number > 0 (the peak learning rate), got nan"),
    (["--lr", "0"], "--lr must be a finite number > 0 (the peak learning rate), got 0.0"),
    (["--min-lr", "inf"], "--min-lr must be a finite number >= 0, got inf"),
    (["--weight-decay", "-0.1"], "--weight-decay must be a finite number >= 0, got -0.1"),
    (["--grad-clip", "nan"], "--grad-clip must be a finite number >= 0 (0: no clipping), got nan"),
    (["--beta2", "1"], "--beta2 must be a number in [0, 1) (AdamW's moment decay), got 1.0"),
])
def test_a_learning_rate_or_optimizer_setting_out_of_range_is_refused_before_any_work(command_error, tmp_path,
                                                                                       flags, line):
    out = tmp_path / "run"
    assert command_error(llama_main, flags + ["--out", str(out)]) == f"error: {line}"
    assert not out.exists()


def test_lr_zero_is_one_line_from_the_shell_too(tmp_path):
    proc = run("architectures.llama3.train", "--lr", "0", "--out", "run", cwd=tmp_path)
    assert_one_line_error(proc, "--lr must be a finite number > 0 (the peak learning rate), got 0.0")
