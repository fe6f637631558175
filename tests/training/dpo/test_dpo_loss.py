"""DPO's loss (training/dpo/loss.py) against TRL 1.16, the reference implementation, and the
properties a preference trainer relies on.

The oracle is `trl.DPOTrainer._compute_loss`, called without building a trainer: it is a plain
method, so it runs on a stand-in `self` that carries the attributes it reads (beta, loss types,
the accelerator's gather, a metrics dict) and a stand-in model whose output holds the per-token
log-probs of each response, zero outside the response as TRL's fused head returns them. With
`precompute_ref_logps` the reference's sequence log-probs come in with the batch, so the
comparison is over exactly the four (B,) log-probs `dpo_loss` takes, on random inputs, for every
loss type and several betas. Tolerance 1e-6 in float64: the same formula in the same order.

Two things TRL 1.16 does not do as the papers write them, handled in the tests below:
- its "ipo" divides each response's log-ratio by its number of tokens (TRL's comment says the
  IPO authors confirmed it), so `dpo_loss` gets per-token mean log-probs to reproduce it;
- its "sigmoid" takes no label_smoothing any more. Conservative DPO is checked against the
  note's formula written out here, and against TRL's "aot_unpaired", which applies the same
  formula to sorted log-ratios and so equals it for a batch of one pair.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from trl import DPOTrainer

from training.dpo import LOSS_TYPES, dpo_loss, dpo_metrics, sequence_logps


class FakeAccelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather


def trl_dpo(per_token_logps, completion_mask, ref_chosen, ref_rejected, beta, loss_type, label_smoothing=0.0):
    """TRL's DPO loss and logged metrics for a batch [chosen rows; rejected rows].

    per_token_logps (2B, T-1): the policy's log-prob of each token after the first, zero outside
    the completion; completion_mask (2B, T)."""
    n, t = completion_mask.shape
    out = SimpleNamespace(log_probs=per_token_logps, entropy=torch.zeros(n, t - 1, dtype=per_token_logps.dtype),
                          mean_logits=torch.zeros(n, t - 1), is_top1=torch.zeros(n, t - 1, dtype=torch.bool))
    fake = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=FakeAccelerator(), aux_loss_enabled=False,
        precompute_ref_logps=True, ld_alpha=None, f_divergence_type="reverse_kl", loss_types=[loss_type],
        loss_weights=[1.0], beta=beta, label_smoothing=label_smoothing, use_weighting=False,
        _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(n, t, dtype=torch.long), "attention_mask": torch.ones(n, t, dtype=torch.long),
              "completion_mask": completion_mask, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    loss = DPOTrainer._compute_loss(fake, lambda **kw: out, inputs, return_outputs=False)
    return loss, {k: v[0] for k, v in fake._metrics["train"].items() if k.startswith("rewards/")}


def random_pairs(b=6, t=9, seed=0):
    """Per-token log-probs of b chosen and b rejected responses of random lengths after a prompt
    of at least one token, and the reference's sequence log-probs."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t, (2 * b,), generator=g)
    completion_mask = (torch.arange(t)[None, :] >= t - lengths[:, None]).long()  # (2B, T): the last `length` tokens
    per_token = -torch.rand(2 * b, t - 1, generator=g, dtype=torch.float64) * 3 * completion_mask[:, 1:]
    ref = per_token.sum(1) + torch.randn(2 * b, generator=g, dtype=torch.float64) * 2  # (2B,)
    return per_token, completion_mask, ref


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.01, 0.1, 0.5, 2.0])
def test_loss_and_logged_rewards_equal_trls(loss_type, beta):
    per_token, mask, ref = random_pairs(seed=int(beta * 100))
    trl_loss, trl_logged = trl_dpo(per_token, mask, *ref.chunk(2), beta, loss_type)
    logps = per_token.sum(1)
    if loss_type == "ipo":  # TRL's IPO works on per-token means
        lengths = mask.sum(1)
        logps, ref = logps / lengths, ref / lengths
    losses, chosen_rewards, rejected_rewards = dpo_loss(*logps.chunk(2), *ref.chunk(2), beta=beta, loss_type=loss_type)
    assert losses.shape == chosen_rewards.shape == rejected_rewards.shape == (6,)
    torch.testing.assert_close(losses.mean(), trl_loss, rtol=1e-6, atol=1e-6)
    if loss_type != "ipo":  # TRL logs the rewards of the summed log-probs
        ours = {k: float(v) for k, v in dpo_metrics(chosen_rewards, rejected_rewards).items()}
        assert ours.keys() == trl_logged.keys() == {"rewards/chosen", "rewards/rejected", "rewards/margins",
                                                   "rewards/accuracies"}
        for k in ours:
            assert ours[k] == pytest.approx(trl_logged[k], rel=1e-6, abs=1e-9), k


def cdpo(h, beta, eps):
    """Conservative DPO, Mitchell (2023): the expected DPO loss when each label is flipped with
    probability eps: -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)."""
    return -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)


@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3, 0.49])
def test_label_smoothing_is_conservative_dpo(beta, eps):
    per_token, mask, ref = random_pairs(b=5, seed=3)
    logps = per_token.sum(1)
    losses, _, _ = dpo_loss(*logps.chunk(2), *ref.chunk(2), beta=beta, label_smoothing=eps)
    (pc, pr), (rc, rr) = logps.chunk(2), ref.chunk(2)
    torch.testing.assert_close(losses, cdpo((pc - rc) - (pr - rr), beta, eps), rtol=1e-12, atol=1e-12)
    for i in range(5):  # one pair at a time: TRL's aot_unpaired sorts nothing, and is cDPO
        rows = [i, i + 5]
        trl_loss, _ = trl_dpo(per_token[rows], mask[rows], ref[i:i + 1], ref[i + 5:i + 6], beta, "aot_unpaired", eps)
        torch.testing.assert_close(losses[i], trl_loss, rtol=1e-6, atol=1e-6)


def test_gradient_raises_the_chosen_and_lowers_the_rejected_log_prob():
    pc, pr = torch.tensor([-5.0, -2.0], requires_grad=True), torch.tensor([-4.0, -3.0], requires_grad=True)
    for loss_type in LOSS_TYPES:
        pc.grad = pr.grad = None
        losses, _, _ = dpo_loss(pc, pr, torch.tensor([-5.0, -2.5]), torch.tensor([-4.0, -2.5]), loss_type=loss_type)
        losses.mean().backward()
        assert (pc.grad < 0).all() and (pr.grad > 0).all(), loss_type  # descent raises pc, lowers pr


def test_rewards_are_beta_times_the_log_ratio_and_carry_no_gradient():
    pc = torch.tensor([-3.0, -1.0], requires_grad=True)
    _, chosen, rejected = dpo_loss(pc, torch.tensor([-2.0, -2.0]), torch.tensor([-4.0, -1.0]),
                                   torch.tensor([-1.0, -3.0]), beta=0.5)
    assert torch.equal(chosen, torch.tensor([0.5, 0.0])) and torch.equal(rejected, torch.tensor([-0.5, 0.5]))
    assert not chosen.requires_grad and not rejected.requires_grad
    m = dpo_metrics(chosen, rejected)
    assert float(m["rewards/margins"]) == pytest.approx(0.25) and float(m["rewards/accuracies"]) == 0.5


def test_at_the_start_policy_equals_reference_and_the_loss_is_log_2():
    """A policy that is still its reference has margin 0: sigmoid loss log 2, rewards 0."""
    logps = torch.tensor([-7.0, -3.0, -11.0])
    losses, chosen, rejected = dpo_loss(logps, logps + 1, logps, logps + 1)
    torch.testing.assert_close(losses, torch.full((3,), torch.log(torch.tensor(2.0)).item()))
    assert not chosen.any() and not rejected.any()


def test_sequence_logps_sums_the_response_tokens_only():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g)
    labels = torch.tensor([[-100, -100, 3, 7, 1], [-100, 4, 4, -100, -100]])
    expected = torch.stack([sum(logits[b, t].log_softmax(-1)[labels[b, t]] for t in range(5) if labels[b, t] != -100)
                            for b in range(2)])
    torch.testing.assert_close(sequence_logps(logits, labels), expected)
    # Only the labelled positions matter: other logits may be anything.
    logits2 = logits.clone()
    logits2[0, :2] = 1e4
    torch.testing.assert_close(sequence_logps(logits2, labels)[0], expected[0])
    assert sequence_logps(logits.bfloat16(), labels).dtype == torch.float32


@pytest.mark.parametrize("kwargs,message", [
    (dict(beta=0.0), "beta must be > 0"),
    (dict(beta=-1.0), "beta must be > 0"),
    (dict(beta=float("nan")), "beta must be > 0"),
    (dict(loss_type="kto"), "unknown DPO loss_type 'kto'; choose one of sigmoid, ipo, hinge"),
    (dict(label_smoothing=0.5), "must be in [0, 0.5)"),
    (dict(label_smoothing=-0.1), "must be in [0, 0.5)"),
    (dict(loss_type="ipo", label_smoothing=0.1), "loss_type 'ipo' does not use it"),
])
def test_bad_arguments_are_refused_with_what_to_do(kwargs, message):
    x = torch.zeros(3)
    with pytest.raises(ValueError, match=None) as e:
        dpo_loss(x, x, x, x, **kwargs)
    assert message in str(e.value)


def test_log_probs_of_different_shapes_are_refused_naming_them():
    with pytest.raises(ValueError) as e:
        dpo_loss(torch.zeros(3), torch.zeros(3), torch.zeros(4), torch.zeros(3))
    assert "reference_chosen_logps (4,)" in str(e.value) and "policy_chosen_logps (3,)" in str(e.value)
    with pytest.raises(ValueError, match="of shape \\(B,\\)"):
        dpo_loss(*[torch.zeros(2, 3)] * 4)
    with pytest.raises(ValueError, match="labels \\(B, T\\) at the same positions"):
        sequence_logps(torch.zeros(2, 5, 7), torch.zeros(2, 4, dtype=torch.long))


@pytest.mark.parametrize("eps", [0.05, 0.1, 0.3])
def test_conservative_dpo_stops_pushing_at_a_finite_margin(eps):
    """notes/dpo.md: with label smoothing eps the loss is smallest at beta h = log((1 - eps) / eps),
    where its gradient vanishes; plain DPO (eps = 0) pushes the margin on forever."""
    beta = 0.5
    h = torch.linspace(-20, 40, 60001, dtype=torch.float64)
    losses, _, _ = dpo_loss(h, torch.zeros_like(h), torch.zeros_like(h), torch.zeros_like(h), beta=beta,
                            label_smoothing=eps)
    best = float(beta * h[losses.argmin()])
    assert best == pytest.approx(math.log((1 - eps) / eps), abs=1e-3)
    plain, _, _ = dpo_loss(h, torch.zeros_like(h), torch.zeros_like(h), torch.zeros_like(h), beta=beta)
    assert (plain[1:] < plain[:-1]).all()  # strictly decreasing: no finite optimum
