"""`python -m training.ppo.train` end to end on a tiny base and a tiny reward model; its minibatch
schedule; and the mistakes it refuses in one line."""

from __future__ import annotations

import json

import pytest
import torch

from training.ppo.rollout import PPORollouts

TINY = ["--max-steps", "4", "--batch-size", "4", "--minibatches", "2", "--epochs", "2", "--eval-interval", "4",
        "--eval-batches", "1", "--train-prompts", "16", "--eval-examples", "4", "--log-interval", "1"]


@pytest.fixture
def reward_dir(chat_base, tmp_path):
    from architectures import registry
    from training.reward import ScalarModel, save_scalar_model
    from training.tokenizer import Tokenizer

    torch.manual_seed(0)
    out = tmp_path / "rm"
    save_scalar_model(ScalarModel(registry.from_pretrained(chat_base)), out, Tokenizer.from_file(chat_base))
    return out


@pytest.mark.slow
def test_ppo_train_logs_what_ppo_is_judged_by(chat_base, reward_dir, tmp_path, monkeypatch, capsys):
    from training.ppo.train import main
    from training.reward import load_scalar_model

    monkeypatch.setenv("ZOO_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "ppo"
    summary = main(["--preset", "tiny", "--base", str(chat_base), "--reward-model", str(reward_dir), "--out", str(out)]
                   + TINY)
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"score"' in line]
    assert len(logged) == 4
    want = {"score", "kl", "return", "accuracy", "entropy", "policy_loss", "value_loss", "policy_clipfrac",
            "value_clipfrac", "approx_kl", "explained_variance", "length"}
    assert want <= set(logged[0])
    assert logged[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # the first rollout's policy is the reference
    assert logged[0]["approx_kl"] == pytest.approx(0.0, abs=1e-6)  # the first minibatch: the policy that sampled
    assert summary["replies_sampled"] == 8 and 0.0 <= summary["exact_match_after"] <= 1.0
    assert (out / "ppo.png").is_file() and (out / "config.json").is_file()
    load_scalar_model(out / "value")  # the value model is saved beside the policy
    assert "after PPO" in capsys.readouterr().out


class Counting(PPORollouts):
    """A rollout is its row numbers, so that the minibatches can be traced back to it."""

    def __init__(self, epochs, minibatches, value_warmup_steps=0):
        super().__init__(None, None, None, None, {}, None, epochs=epochs, minibatches=minibatches, temperature=1.0,
                         max_new_tokens=1, kl_coef=0.0, gamma=1.0, lam=1.0, missing_eos_penalty=0.0,
                         value_warmup_steps=value_warmup_steps)
        self.rollouts = 0

    def rollout(self, split, n, generator):
        self.rollouts += 1
        return {"row": torch.arange(n) + 1000 * self.rollouts}


def test_each_rollout_serves_epochs_passes_of_minibatches():
    sampler = Counting(epochs=3, minibatches=2)
    g = torch.Generator().manual_seed(0)
    batches = [sampler("train", 4, g)["row"] for _ in range(12)]
    assert sampler.rollouts == 2
    for first in (0, 6):
        rollout = batches[first:first + 6]
        for epoch in range(3):  # each epoch visits each of the rollout's 8 replies once
            seen = torch.cat(rollout[2 * epoch:2 * epoch + 2])
            assert sorted(seen.tolist()) == list(range(1000 * (first // 6 + 1), 1000 * (first // 6 + 1) + 8))


def test_the_value_warmup_leaves_the_policy_out_and_the_value_model_learns_at_its_own_rate():
    from training.ppo.train import ppo_optimizer, ppo_step
    from training.ppo.rollout import PolicyAndValue
    from training.train_config import TrainConfig

    sampler = Counting(epochs=1, minibatches=1, value_warmup_steps=3)
    g = torch.Generator().manual_seed(0)
    assert [float(sampler("train", 2, g)["policy_weight"][0]) for _ in range(5)] == [0, 0, 0, 1, 1]

    class Tiny(torch.nn.Module):  # a (B, T) -> (B, T, V) policy, a (B, T) -> (B, T) value model
        def __init__(self, out):
            super().__init__()
            self.emb, self.out = torch.nn.Embedding(5, 4), out

        def forward(self, ids):
            h = self.emb(ids)
            return h[..., :3] if self.out == 3 else h.sum(-1)

    torch.manual_seed(0)
    model = PolicyAndValue(Tiny(3), Tiny(1))
    batch = {"input_ids": torch.tensor([[1, 2, 3]]), "targets": torch.tensor([[-100, 1, 2]]),
             "old_logps": torch.full((1, 3), -1.0), "old_values": torch.zeros(1, 3),
             "advantages": torch.tensor([[0.0, 1.0, -1.0]]), "returns": torch.ones(1, 3),
             "score": torch.ones(1), "kl_sum": torch.zeros(1), "return": torch.ones(1), "correct": torch.ones(1),
             "length": torch.full((1,), 2.0), "explained_variance": torch.zeros(1)}
    for weight, policy_learns in ((0.0, False), (1.0, True)):
        model.zero_grad(set_to_none=True)
        loss, _ = ppo_step(model, dict(batch, policy_weight=torch.full((1,), weight)), clip_eps=0.2, clip_value=0.2,
                           vf_coef=0.1)
        loss.backward()
        assert (model.policy.emb.weight.grad is not None) == policy_learns  # None: AdamW keeps no state for it
        assert model.value.emb.weight.grad is not None
    cfg = TrainConfig(lr=1e-4, weight_decay=0.1)
    optimizer = ppo_optimizer(1e-3)(model, cfg, torch.device("cpu"))
    rates = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    assert rates[id(model.value.emb.weight)] == 1e-3 and rates[id(model.policy.emb.weight)] == 1e-4
    assert len(rates) == len(list(model.parameters()))


@pytest.mark.parametrize("flags,message", [
    (["--kl-coef", "-0.1"], "--kl-coef must be a finite number >= 0"),
    (["--gamma", "1.5"], "--gamma must be in [0, 1]"),
    (["--lam", "-0.05"], "--lam must be in [0, 1]"),
    (["--value-lr", "-0.001"], "--value-lr must be a finite number >= 0"),
    (["--value-warmup-steps", "-1"], "--value-warmup-steps must be an integer >= 0"),
])
def test_bad_numbers_are_one_line_errors(chat_base, reward_dir, tmp_path, command_error, flags, message):
    from training.ppo.train import main

    line = command_error(main, ["--base", str(chat_base), "--reward-model", str(reward_dir), "--out",
                                str(tmp_path / "o")] + TINY + flags)
    assert message in line


def test_a_reward_model_directory_without_a_head_is_a_one_line_error(chat_base, tmp_path, command_error):
    from training.ppo.train import main

    line = command_error(main, ["--base", str(chat_base), "--reward-model", str(chat_base), "--out",
                                str(tmp_path / "o")] + TINY)
    assert "--reward-model" in line and "holds no reward head" in line
