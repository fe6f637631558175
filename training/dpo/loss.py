"""DPO's loss: preference pairs trained against a frozen reference, with no reward model.

Papers:
- DPO, "Direct Preference Optimization: Your Language Model is Secretly a Reward Model"
  (Rafailov et al., 2023, arXiv:2305.18290), eq. 7: the "sigmoid" loss;
- conservative DPO (cDPO), "A note on DPO with noisy preferences & relationship to IPO"
  (Mitchell, 2023): `label_smoothing` = the probability that a pair's label is flipped;
- IPO, "A General Theoretical Paradigm to Understand Learning from Human Preferences"
  (Azar et al., 2023, arXiv:2310.12036), eq. 17: the "ipo" loss;
- SLiC, "SLiC-HF: Sequence Likelihood Calibration with Human Feedback" (Zhao et al., 2023,
  arXiv:2305.10425): the "hinge" loss on the same log-ratio margin.

Symbols (notes/dpo.md): y_w the chosen response, y_l the rejected one, pi the policy being
trained, pi_ref the frozen reference, beta the strength of the KL leash to pi_ref. With

    h = [log pi(y_w) - log pi_ref(y_w)] - [log pi(y_l) - log pi_ref(y_l)]

    sigmoid  -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)       (eps = label_smoothing)
    ipo      (h - 1 / (2 beta))^2
    hinge    max(0, 1 - beta h)

and the implicit rewards r(y) = beta (log pi(y) - log pi_ref(y)) of the chosen and rejected
responses, detached: what TRL logs as rewards/chosen and rewards/rejected.

Tested against TRL 1.16's `DPOTrainer._compute_loss` (tests/training/dpo/test_dpo_loss.py).
Two conventions of TRL to know: its "ipo" divides each response's log-ratio by the response's
number of tokens before squaring (so pass per-token mean log-probs to reproduce it), and its
"sigmoid" no longer takes label_smoothing; cDPO is written here from the note's formula (for a
single pair it equals TRL's "aot_unpaired", which the test uses).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from architectures.common.loss import IGNORE_INDEX

LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log pi(response | prompt) of each row: the sum of the log-probabilities of its labelled tokens.

    logits (B, T, V); labels (B, T), already aligned with the logits' positions as everywhere in
    the zoo (labels[:, t] is the token that logits[:, t] predicts, i.e. input_ids shifted left by
    one, as in lm_loss's (x, y) and SFT's batches), with -100 on the prompt and the padding, which
    add nothing. No shift happens here. Returns (B,), in fp32 at least (bf16 logits would round
    the log-sum-exp)."""
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"sequence_logps takes logits (B, T, V) and labels (B, T) at the same positions; got "
                         f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)}")
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    # cross_entropy is -log p(label), and 0 where the label is -100: summed, the response's log-prob.
    token_nll = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none",
                                ignore_index=IGNORE_INDEX)  # (B*T,)
    return -token_nll.view(labels.shape).sum(dim=-1)  # (B,)


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             reference_chosen_logps: torch.Tensor, reference_rejected_logps: torch.Tensor, beta: float = 0.1,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(losses, chosen_rewards, rejected_rewards), each (B,), from four (B,) sequence log-probs.

    The batch loss is losses.mean(). The rewards are beta x the policy's log-ratio to the
    reference, detached: they only describe training (`dpo_metrics`)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")
    if not beta > 0:  # also refuses NaN
        raise ValueError(f"beta must be > 0 (it scales the KL leash to the reference; DPO uses 0.1 to 0.5), got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing is the probability that a preference label is flipped and must be in "
                         f"[0, 0.5) (at 0.5 the labels carry no information), got {label_smoothing}")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing is conservative DPO's, a variant of the sigmoid loss; loss_type "
                         f"{loss_type!r} does not use it (pass label_smoothing=0.0)")
    inputs = {"policy_chosen_logps": policy_chosen_logps, "policy_rejected_logps": policy_rejected_logps,
              "reference_chosen_logps": reference_chosen_logps, "reference_rejected_logps": reference_rejected_logps}
    shapes = {name: tuple(t.shape) for name, t in inputs.items()}
    if len(set(shapes.values())) != 1 or policy_chosen_logps.dim() != 1:
        raise ValueError("the four log-probs must each be one number per pair, of shape (B,), and all the same shape; "
                         "got " + ", ".join(f"{name} {shape}" for name, shape in shapes.items()))

    chosen_logratios = policy_chosen_logps - reference_chosen_logps  # log pi/pi_ref of y_w, (B,)
    rejected_logratios = policy_rejected_logps - reference_rejected_logps  # log pi/pi_ref of y_l, (B,)
    h = chosen_logratios - rejected_logratios  # the margin: the implicit rewards' difference / beta
    if loss_type == "sigmoid":
        # Bradley-Terry likelihood of the labels, with the implicit reward in place of a reward model;
        # cDPO mixes in the likelihood of the flipped label with weight eps.
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        # Regress the margin onto 1/(2 beta) instead of pushing it to infinity: the optimum stays finite
        # even for pairs that are always preferred the same way.
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        # SLiC's calibration hinge: no gradient once the margin beta h exceeds 1.
        losses = torch.relu(1 - beta * h)
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards


def dpo_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    """The batch means TRL logs, under its names: the implicit rewards of the chosen and rejected
    responses, their margin, and how often the chosen one's reward is the higher."""
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
    }
