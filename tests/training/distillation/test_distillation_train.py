"""python -m training.distillation.train end to end on a tiny teacher made here, and its refusals.

The teacher is a 1-layer Llama 3 trained for 3 steps, made once for the file;
the student is smaller still. The runs check the files and figures of the contract, that the
baseline starts from the student's initial weights and reads the same token windows, that
on-policy rows are the student's own text, and that bad input is refused in one line before
anything trains.
"""

from __future__ import annotations

import json

import pytest
import torch

from architectures.llama3 import Llama3, LlamaConfig, save_pretrained
from architectures.llama3.train import main as llama_main
from training.distillation.train import DistillConfig, distillation_batches, main, make_loss, student_rollouts
from training.loss_protocol import NUM_TOKENS

SMALL = ["--batch-size", "4", "--block-size", "32", "--eval-interval", "2", "--eval-batches", "1",
         "--log-interval", "2"]
STUDENT = ["--student-config", "hidden_size=16,intermediate_size=32,num_hidden_layers=1,num_attention_heads=2,"
                               "num_key_value_heads=1"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models have a few thousand parameters: one thread runs them faster than two, and far
    faster when the machine's cores are shared with other jobs (two threads then wait on each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A 1-layer Llama 3 trained 3 steps, made once for this file, with its own caches. Its text is not
    the tests' corpus: a byte-level BPE tokenizer encodes any text, as a real teacher's would."""
    root = tmp_path_factory.mktemp("teacher")
    text = root / "corpus.txt"
    text.write_text("".join(f"Verse {i}: all the world's a stage, and all the men and women merely players.\n"
                            for i in range(300)))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ZOO_CACHE_DIR", str(root / "cache"))
        llama_main(["--dataset", str(text), "--out", str(root / "run"), "--max-steps", "3", "--hidden-size", "32",
                    "--intermediate-size", "64", "--num-hidden-layers", "1", "--num-attention-heads", "2",
                    "--num-key-value-heads", "1", "--bpe-vocab-size", "300", *SMALL])
    return root / "run"


def distill(corpus, teacher, out, *extra):
    return main(["--preset", "tiny", "--dataset", str(corpus), "--teacher", str(teacher), "--out", str(out),
                 "--max-steps", "4", *SMALL, *STUDENT, *extra])


def test_tiny_preset_distils_beside_the_baseline_and_resumes_both(corpus, teacher, tmp_path, capsys):
    out = tmp_path / "run"
    distill(corpus, teacher, out, "--max-steps", "2")
    assert (out / "baseline/model.safetensors").is_file() and (out / "distillation.png").is_file()
    summary = distill(corpus, teacher, out, "--resume")  # on to the preset's --max-steps 4 given here
    for name in ("config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl", "loss.png", "summary.json",
                 "student_val.jsonl", "distillation.png", "baseline/model.safetensors", "baseline/student_val.jsonl"):
        assert (out / name).is_file(), name
    assert (out / "tokenizer.json").read_text() == (teacher / "tokenizer.json").read_text()  # the teacher's tokenizer
    printed = capsys.readouterr().out
    assert "---- sample ----" in printed and "validation nats/char (whole split): teacher" in printed
    assert summary["steps"] == 4 and summary["family"] == "llama3"
    for key in ("val_nats_per_char", "teacher_val_nats_per_char", "baseline_val_nats_per_char",
                "student_val_nats_per_char_before"):
        assert summary[key] > 0, key
    written = json.loads((out / "summary.json").read_text())
    assert written["baseline_val_nats_per_char"] == summary["baseline_val_nats_per_char"]
    distilled = [json.loads(line) for line in (out / "student_val.jsonl").read_text().splitlines()]
    baseline = [json.loads(line) for line in (out / "baseline/student_val.jsonl").read_text().splitlines()]
    assert [p["step"] for p in distilled] == [p["step"] for p in baseline] == [0, 2, 4]
    assert distilled[0] == baseline[0]  # the same initial weights, measured on the same batches
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in metrics if "divergence" in e] == [2, 4]


def test_a_student_of_another_family_distils_with_every_option(corpus, teacher, tmp_path, capsys):
    """A Mixtral student of the Llama 3 teacher, with the jsd, a hard-label share and on-policy
    batches; its baseline trains with Mixtral's own loss (balance and z-loss included)."""
    out = tmp_path / "run"
    summary = distill(corpus, teacher, out, "--max-steps", "2", "--student-family", "mixtral", "--student-config",
                      "hidden_size=16,intermediate_size=16,num_hidden_layers=1,num_attention_heads=2,"
                      "num_key_value_heads=1,num_local_experts=2,num_experts_per_tok=1",
                      "--kind", "jsd", "--beta", "0.3", "--alpha", "0.2", "--on-policy", "0.5", "--prompt-tokens", "8")
    assert summary["family"] == "mixtral" and summary["baseline_val_nats_per_char"] > 0
    assert json.loads((out / "config.json").read_text())["model_type"] == "mixtral"
    baseline_metrics = (out / "baseline/metrics.jsonl").read_text()
    assert "aux_loss" in baseline_metrics  # Mixtral's own pretraining loss
    printed = capsys.readouterr().out
    assert "distilling with jsd (beta 0.3) at temperature 1.0, alpha 0.2, on-policy 0.5" in printed
    assert "note: the teacher was trained on" in printed  # its corpus is not this one


def test_on_policy_rows_are_the_students_continuations_of_the_data(corpus, teacher, tmp_path):
    """With lambda = 1 every training batch is on-policy: its rows keep the data's prompt, the rest is
    what the student samples (reproducibly, from the row's seed), and only that rest is distilled."""
    torch.manual_seed(0)
    student = Llama3(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64))
    cfg = DistillConfig(on_policy=1.0, prompt_tokens=5)
    x = torch.randint(0, 50, (2, 12))
    batch = {"input_ids": x, "labels": torch.roll(x, -1, 1), "on_policy": torch.tensor([True, False]),
             "sample_seed": torch.tensor([3, 4])}
    ids, labels, hard = student_rollouts(student, batch, cfg)
    assert torch.equal(ids[0, :5], x[0, :5]) and not torch.equal(ids[0], x[0])
    assert torch.equal(ids[1], x[1]) and torch.equal(labels[1], batch["labels"][1])  # an off-policy row is untouched
    assert (labels[0, :4] == -100).all() and torch.equal(labels[0, 4:-1], ids[0, 5:])
    assert (hard[0] == -100).all() and torch.equal(hard[1], labels[1])
    again = student_rollouts(student, batch, cfg)
    assert torch.equal(again[0], ids)  # the row's seed makes the sample reproducible
    assert student.training

    loss, metrics = make_loss(cfg)(student, batch, {"teacher": student})
    assert loss.item() == pytest.approx(0.0, abs=1e-5)  # a teacher equal to the student: nothing to learn
    assert int(metrics[NUM_TOKENS]) == 8 + 12  # the sampled tokens of row 0 and every token of row 1


def test_batches_are_the_baselines_windows_with_an_on_policy_draw(corpus, teacher, tmp_path):
    from training.cli import load_data
    from training.distillation.train import DistillDataConfig
    from training.tokenizer import Tokenizer

    data = load_data(DistillDataConfig(dataset=str(corpus)), None, tmp_path, tokenizer=Tokenizer.from_file(teacher))
    sample = distillation_batches(data, DistillConfig(on_policy=0.5), 16)
    plain = data.batches(16)
    flags = []
    for step in range(20):
        g1, g2 = torch.Generator().manual_seed(step), torch.Generator().manual_seed(step)
        batch, (x, y) = sample("train", 3, g1), plain("train", 3, g2)
        assert torch.equal(batch["input_ids"], x) and torch.equal(batch["labels"], y)
        flags.append(bool(batch["on_policy"].all()) if batch["on_policy"].any() else False)
    assert 0 < sum(flags) < 20  # about half of the batches
    assert not sample("val", 3, torch.Generator().manual_seed(0))["on_policy"].any()


@pytest.mark.parametrize("argv,message", [
    (["--kind", "kl"], "--kind 'kl' is not one of forward_kl, reverse_kl, jsd"),
    (["--beta", "1.5"], "--beta 1.5 must be in [0, 1]"),
    (["--temperature", "0"], "--temperature 0.0 must be a finite number > 0"),
    (["--alpha", "2"], "--alpha 2.0 must be in [0, 1]"),
    (["--on-policy", "0.5", "--prompt-tokens", "32"], "--prompt-tokens 32 must be in [1, block_size=32)"),
    (["--student-config", "hidden_sise=8"], "unknown option --hidden_sise"),
    (["--student-config", "hidden_size"], "expected name=value items"),
    (["--student-config", "vocab_size=9"], "vocab_size is the teacher's tokenizer's"),
    (["--student-family", "gpt5"], "unknown architecture family 'gpt5'"),
    (["--teacher", "{tmp}/nowhere"], "has no config.json"),
])
def test_bad_options_are_refused_in_one_line_before_anything_trains(argv, message, corpus, tmp_path, command_error):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    line = command_error(main, ["--dataset", str(corpus), "--teacher", str(tmp_path / "unused"), "--out",
                                str(tmp_path / "run"), *SMALL, *argv])
    assert message in line
    assert not (tmp_path / "run").exists()


def test_a_student_with_another_vocabulary_is_refused_naming_both(corpus, teacher, tmp_path, command_error):
    other = tmp_path / "other"
    save_pretrained(Llama3(LlamaConfig(vocab_size=280, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1)), other)
    line = command_error(main, ["--dataset", str(corpus), "--teacher", str(teacher), "--student", str(other),
                                "--out", str(tmp_path / "run"), *SMALL])
    assert "vocab_size=300" in line and "vocab_size=280" in line and "same vocabulary" in line
