"""`python -m training.dpo.train` end to end on a tiny base, and its preference data."""

import json

import pytest

from training.checkpointing import read_record
from training.dpo.data import Pair, encode_pairs, load_pairs, near_miss

TINY = ["--max-steps", "2", "--batch-size", "4", "--eval-interval", "2", "--eval-batches", "1", "--train-pairs", "12",
        "--test-pairs", "4", "--log-interval", "1"]


@pytest.mark.parametrize("extra", [[], ["--lora", "true", "--loss-type", "ipo"], ["--rpo-alpha", "1.0"]])
def test_dpo_train_logs_trl_rewards_and_reports_preference_accuracy(chat_base, tmp_path, monkeypatch, capsys, extra):
    from training.dpo.train import main

    monkeypatch.setenv("ZOO_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "dpo"
    summary = main(["--preset", "tiny", "--base", str(chat_base), "--out", str(out)] + TINY + extra)
    assert 0.0 <= summary["preference_accuracy"] <= 1.0 and summary["kl_per_token"] > -1e-6  # 0 up to rounding
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"} <= set(logged[0])
    assert "held-out preference accuracy" in capsys.readouterr().out
    assert read_record(out)["chat_format"] == "zoo"  # what generate asks the model in


def test_beta_of_zero_is_a_one_line_error(chat_base, tmp_path, command_error):
    from training.dpo.train import main

    line = command_error(main, ["--base", str(chat_base), "--out", str(tmp_path / "o"), "--beta", "0"] + TINY)
    assert "--beta must be a finite number > 0" in line


def test_a_pair_whose_chosen_and_rejected_are_identical_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps({"prompt": "What is 1 + 1?", "chosen": "2", "rejected": "2"}) + "\n")
    with pytest.raises(ValueError, match="chosen and rejected are the same reply"):
        load_pairs(str(path))


def test_preference_files_with_strings_or_messages_load(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_CACHE_DIR", str(tmp_path / "cache"))
    rows = [{"prompt": "What is 1 + 1?", "chosen": "2", "rejected": "3"},  # a file holds one layout or the other
            {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello"}],
             "rejected": [{"role": "assistant", "content": "Go away"}]}]
    pairs = []
    for i, row in enumerate(rows):
        path = tmp_path / f"prefs{i}.jsonl"
        path.write_text(json.dumps(row) + "\n")
        pairs += load_pairs(str(path))
    assert pairs[0] == Pair(({"role": "user", "content": "What is 1 + 1?"},), "2", "3")
    assert pairs[1] == Pair(({"role": "user", "content": "Hi"},), "Hello", "Go away")


def test_near_misses_are_wrong_and_close():
    import random

    rng = random.Random(0)
    for answer in ["0", "7", "42", "-15", "198"]:
        miss = near_miss(answer, rng)
        assert miss != answer and abs(int(miss) - int(answer)) <= 100


def test_sequence_log_probs_of_a_pair_count_only_the_reply(chat_base):
    from training.chat import ZooChat
    from training.tokenizer import Tokenizer

    fmt = ZooChat(Tokenizer.from_file(chat_base))
    (chosen, rejected), = encode_pairs([Pair(({"role": "user", "content": "What is 1 + 1?"},), "2", "13")], fmt, 64)
    assert sum(chosen.trained) == len(fmt.tokenizer.encode("2")) + 1  # the reply and its end-of-turn token
    assert sum(rejected.trained) == len(fmt.tokenizer.encode("13")) + 1


def test_rpo_adds_the_chosen_replies_mean_nll_to_the_dpo_loss(chat_base):
    import torch

    from architectures.llama3 import from_pretrained
    from training.chat import ZooChat
    from training.dpo.data import collate
    from training.dpo.train import dpo_step
    from training.tokenizer import Tokenizer

    model = from_pretrained(chat_base)
    fmt = ZooChat(Tokenizer.from_file(chat_base))
    pairs = encode_pairs([Pair(({"role": "user", "content": f"What is {i} + 1?"},), str(i + 1), str(i + 2))
                          for i in range(3)], fmt, 64)
    batch = collate(pairs, 64, 2)
    frozen = {"reference": from_pretrained(chat_base)}
    plain, _ = dpo_step(model, batch, frozen, beta=0.1, loss_type="sigmoid", label_smoothing=0.0)
    rpo, metrics = dpo_step(model, batch, frozen, beta=0.1, loss_type="sigmoid", label_smoothing=0.0, rpo_alpha=0.5)
    logits = model(batch["chosen_input_ids"])
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["chosen_labels"].flatten())  # mean over tokens
    torch.testing.assert_close(metrics["nll_loss"], nll, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rpo, plain + 0.5 * nll, rtol=1e-5, atol=1e-6)
