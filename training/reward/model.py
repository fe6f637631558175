"""A zoo language model with a scalar head: a reward model, or PPO's value model.

`ScalarModel` puts one linear unit, hidden size -> 1, on the final hidden states of any zoo
`CausalLM` (its language-model head is kept, unused, so the trunk stays a loadable checkpoint):
`model(ids)` is one number per position (B, T). A reward model reads it at a reply's last token,
the end-of-turn, where the trunk has seen the prompt and the whole reply (`ScalarModel.score`);
PPO's value model reads it at every position of the reply.

With `likelihood=True` the score also has a term that a linear head on the hidden states cannot
compute: the trunk's own log-likelihood of the reply, sum_t log p_trunk(y_t | x, y_<t), times a
learned weight (`likelihood_weight`, starting at 0, trained by the same Bradley-Terry loss). Whether
an answer is right is a comparison of each answer token with what the trunk predicted one position
earlier; the language-model head makes exactly that comparison, while a linear unit reading one
position's hidden state would need the trunk to learn it anew (notes/ppo.md measures both).

On disk a reward model is a zoo checkpoint directory (config.json, model.safetensors,
tokenizer.json: the trunk, loadable by itself) plus its head: `reward_head.safetensors` (the
head's weight and bias) and `reward_head.json`, the marker `load_scalar_model` checks, which says
what the head reads. A directory without the marker is refused in one line: a plain language
model given where a reward model is expected would otherwise get a fresh, random head.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from architectures import registry
from architectures.utils.files import atomic_write, atomic_write_json

HEAD_WEIGHTS = "reward_head.safetensors"
HEAD_MARKER = "reward_head.json"
FORMAT = "llm-zoo scalar head"


class ScalarModel(nn.Module):
    """trunk (a zoo CausalLM) -> final hidden states (B, T, D) -> head -> (B, T)."""

    def __init__(self, trunk: nn.Module, likelihood: bool = False):
        super().__init__()
        self.trunk = trunk
        width = trunk.config.hidden_size
        self.head = nn.Linear(width, 1)
        # As OpenAI's lm-human-preferences initialises its reward head (Huang et al. 2024, detail 10):
        # N(0, 1 / sqrt(D + 1)), bias 0, so the first scores are of order 1.
        nn.init.normal_(self.head.weight, std=1 / (width + 1) ** 0.5)
        nn.init.zeros_(self.head.bias)
        # The weight of the trunk's log-likelihood of the reply in the score; None: no such term.
        self.likelihood_weight = nn.Parameter(torch.zeros(())) if likelihood else None

    @property
    def config(self):
        return self.trunk.config

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden = self.trunk(ids, hidden_only=True)  # (B, T, D)
        return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1).float()  # (B, T)

    def score(self, ids: torch.Tensor, last: torch.Tensor, first: torch.Tensor | None = None) -> torch.Tensor:
        """The reward of each row (B,): the head at index last[b] (the reply's last token) of row b,
        plus, with a likelihood term, likelihood_weight x the trunk's log-likelihood of the reply's
        tokens first[b] .. last[b]."""
        hidden = self.trunk(ids, hidden_only=True)  # (B, T, D)
        rows = torch.arange(ids.shape[0], device=ids.device)
        scores = self.head(hidden[rows, last].to(self.head.weight.dtype)).squeeze(-1).float()  # (B,)
        if self.likelihood_weight is None:
            return scores
        if first is None:
            raise ValueError("this reward model scores the trunk's log-likelihood of the reply, so score() needs "
                             "first, the index of each reply's first token")
        return scores + self.likelihood_weight.float() * reply_log_likelihood(self.trunk, hidden, ids, first, last)

    @torch.no_grad()
    def normalise(self, scores: torch.Tensor) -> None:
        """Rescale the head so that these scores (of reference replies) have mean 0 and std 1
        (Huang et al. 2024, detail 13: the reward is normalised on the SFT model's replies, so that a
        reply as good as theirs scores 0 and the KL penalty meets the score on a known scale)."""
        mean, std = scores.float().mean(), scores.float().std().clamp_min(1e-6)
        self.head.bias.sub_(mean).div_(std)
        self.head.weight.div_(std)
        if self.likelihood_weight is not None:
            self.likelihood_weight.div_(std)


def reply_log_likelihood(trunk: nn.Module, hidden: torch.Tensor, ids: torch.Tensor, first: torch.Tensor,
                         last: torch.Tensor) -> torch.Tensor:
    """(B,) sum over t in [first[b], last[b]] of log p(ids[b, t] | ids[b, :t]), from the trunk's final
    hidden states (B, T, D) through its own language-model head (the prediction at t - 1 of token t)."""
    if bool((first < 1).any()) or bool((first > last).any()):
        raise ValueError("each reply must start after position 0 and end at or after its start (first <= last)")
    logps = torch.log_softmax(trunk.compute_logits(hidden[:, :-1]).float(), -1)  # (B, T - 1, V)
    logps = logps.gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, T - 1): log p of token t at index t - 1
    t = torch.arange(1, ids.shape[1], device=ids.device)[None]  # (1, T - 1)
    inside = (t >= first[:, None]) & (t <= last[:, None])
    return (logps * inside).sum(1)


def save_scalar_model(model: ScalarModel, directory: str | Path, tokenizer=None,
                      state_dict: dict | None = None, role: str = "reward") -> None:
    """The trunk as its family's checkpoint, the head's weights, the marker, and the tokenizer."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    trunk_state = head_state = None
    if state_dict is not None:  # a gathered copy (FSDP2): split it between the trunk and the head
        trunk_state = {k[len("trunk."):]: v for k, v in state_dict.items() if k.startswith("trunk.")}
        head_state = {k[len("head."):]: v for k, v in state_dict.items() if k.startswith("head.")}
    registry.family(registry.family_of(model.trunk)).save_pretrained(model.trunk, directory, trunk_state)
    head = head_state or {k: v.detach() for k, v in model.head.state_dict().items()}
    if model.likelihood_weight is not None:
        head["likelihood_weight"] = (state_dict or {}).get("likelihood_weight", model.likelihood_weight).reshape(1)
    head = {k: v.detach().float().cpu().contiguous() for k, v in head.items()}
    atomic_write(directory / HEAD_WEIGHTS, lambda tmp: save_file(head, str(tmp)))
    atomic_write_json(directory / HEAD_MARKER, {"format": FORMAT, "role": role,
                                                "hidden_size": model.head.in_features,
                                                "reads": "the reply's last token (its end-of-turn)" +
                                                (" plus the trunk's log-likelihood of the reply"
                                                 if model.likelihood_weight is not None else "")})
    if tokenizer is not None:
        tokenizer.save(directory / "tokenizer.json")


def is_scalar_model(directory: str | Path) -> bool:
    return (Path(directory) / HEAD_MARKER).is_file()


def load_scalar_model(directory: str | Path, flag: str = "--reward-model", device="cpu") -> ScalarModel:
    """The ScalarModel saved in `directory`, or a one-line error naming `flag` when the directory is
    missing or holds no reward head."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{flag} {directory} does not exist; train a reward model with "
                                f"python -m training.reward.train --out {directory}")
    marker = directory / HEAD_MARKER
    if not marker.is_file():
        kind = "a language-model checkpoint" if (directory / "config.json").is_file() else "no checkpoint"
        raise FileNotFoundError(f"{flag} {directory} holds no reward head ({HEAD_MARKER} is missing: it is {kind}, "
                                f"not a reward model); train one with python -m training.reward.train "
                                f"--base {directory} --out DIR and pass that DIR")
    info = json.loads(marker.read_text())
    if info.get("format") != FORMAT or not (directory / HEAD_WEIGHTS).is_file():
        raise ValueError(f"{flag} {directory}: {HEAD_MARKER} is not a zoo reward head's marker, or "
                         f"{HEAD_WEIGHTS} is missing; retrain it with python -m training.reward.train")
    trunk = registry.from_pretrained(directory, device=device)
    head = load_file(str(directory / HEAD_WEIGHTS))
    likelihood = head.pop("likelihood_weight", None)
    model = ScalarModel(trunk, likelihood=likelihood is not None)
    if likelihood is not None:
        model.likelihood_weight.data.copy_(likelihood.reshape(()))
    if head["weight"].shape != model.head.weight.shape:
        raise ValueError(f"{flag} {directory}: the head reads {head['weight'].shape[1]} features but the trunk's "
                         f"hidden size is {model.head.in_features}; the two files are from different models")
    model.head.load_state_dict(head)
    return model.to(device)
