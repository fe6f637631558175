"""`python -m training.grpo.train` end to end on a tiny base: engine rollouts, rewards, the loop."""

import json

import torch

from training.checkpointing import read_record
from training.grpo.rollout import arithmetic_reward, token_logps

TINY = ["--max-steps", "2", "--batch-size", "8", "--group-size", "4", "--eval-interval", "2", "--eval-batches", "1",
        "--train-prompts", "16", "--eval-examples", "4", "--log-interval", "1"]


def test_grpo_train_samples_groups_and_logs_the_reward(chat_base, tmp_path, monkeypatch, capsys):
    from training.grpo.train import main

    monkeypatch.setenv("ZOO_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "grpo"
    summary = main(["--preset", "tiny", "--base", str(chat_base), "--out", str(out)] + TINY)
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"reward"' in line]
    assert len(logged) == 2 and {"reward", "accuracy", "length", "kl", "clip_ratio"} <= set(logged[0])
    assert logged[0]["kl"] == 0.0  # the first update's policy is the reference
    assert (out / "grpo.png").is_file() and 0.0 <= summary["exact_match_after"] <= 1.0
    assert "after GRPO" in capsys.readouterr().out
    assert read_record(out)["chat_format"] == "zoo"  # what generate asks the model in


def test_a_group_of_one_is_a_one_line_error(chat_base, tmp_path, command_error):
    from training.grpo.train import main

    line = command_error(main, ["--base", str(chat_base), "--out", str(tmp_path / "o")] + TINY + ["--group-size", "1"])
    assert "--group-size must be >= 2" in line


def test_a_temperature_of_zero_is_a_one_line_error(chat_base, tmp_path, command_error):
    from training.grpo.train import main

    line = command_error(main, ["--base", str(chat_base), "--out", str(tmp_path / "o")] + TINY + ["--temperature", "0"])
    assert "--temperature must be a finite number > 0" in line


def test_token_logps_are_those_of_the_tempered_distribution_the_rollouts_sample():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5)
    ids = torch.zeros(2, 3, dtype=torch.long)
    targets = torch.tensor([[1, -100, 4], [0, 2, -100]])
    got = token_logps(lambda x: logits, ids, targets, temperature=0.5)
    want = torch.log_softmax(logits / 0.5, -1).gather(-1, targets.clamp_min(0)[..., None])[..., 0] * (targets != -100)
    assert torch.allclose(got, want)
    assert torch.allclose(token_logps(lambda x: logits, ids, targets), torch.log_softmax(logits, -1).gather(
        -1, targets.clamp_min(0)[..., None])[..., 0] * (targets != -100))


def test_the_reward_is_the_exact_answer_plus_a_format_term():
    got = arithmetic_reward(["42", "41", "forty-two", ""], ["42"] * 4, format_weight=0.1)
    assert torch.allclose(got, torch.tensor([1.1, 0.1, 0.0, 0.0]))
