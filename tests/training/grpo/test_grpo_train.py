"""`python -m training.grpo.train` end to end on a tiny base: engine rollouts, rewards, the loop."""

import json

import torch

from training.grpo.rollout import arithmetic_reward

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


def test_a_group_of_one_is_a_one_line_error(chat_base, tmp_path, command_error):
    from training.grpo.train import main

    line = command_error(main, ["--base", str(chat_base), "--out", str(tmp_path / "o")] + TINY + ["--group-size", "1"])
    assert "--group-size must be >= 2" in line


def test_the_reward_is_the_exact_answer_plus_a_format_term():
    got = arithmetic_reward(["42", "41", "forty-two", ""], ["42"] * 4, format_weight=0.1)
    assert torch.allclose(got, torch.tensor([1.1, 0.1, 0.0, 0.0]))
