"""The reward model's pairs: preference pairs of the built-in arithmetic task, and their batches.

Two sources, both from training/tasks.py's arithmetic questions, both checked by the task's own
checker (`arithmetic_reward`: 1 for the exact answer, + a small term for a bare integer):

- DPO's pairs (`arithmetic_pairs`, training/dpo/data.py): the right answer over the SFT model's
  own wrong answer, or a near miss where it answered right;
- pairs ranked by the checker (`ranked_pairs`): a few replies sampled from the SFT model for each
  question plus the right answer, scored by the checker; any two with different scores make a
  pair, the higher-scoring one chosen. These are the pairs the reward model will be asked about
  in PPO: the policy's own samples, wrong in the ways it is wrong (a wrong integer, or no integer).

Held-out pairs are made the same way from the test split's questions. A batch holds both replies
of each pair as whole rendered conversations, padded, and the index of each one's last token
(its end-of-turn), where `ScalarModel.score` reads the reward, and of each one's first reply token
(the same for both: they share the prompt), where its log-likelihood term starts.
"""

from __future__ import annotations

import itertools
import random

import torch

from training.chat import ChatFormat
from training.dpo.data import Pair, check_pair
from training.grpo.rollout import arithmetic_reward


def ranked_pairs(model, fmt: ChatFormat, examples: list, samples: int, pairs_per_question: int, seed: int = 0,
                 max_new_tokens: int = 8, format_weight: float = 0.1) -> list[Pair]:
    """Up to `pairs_per_question` pairs per question among `samples` sampled replies (temperature 1)
    and the right answer, ranked by the checker; replies with equal scores are not paired."""
    from training.tasks import replies

    prompts = [e.prompt for e in examples for _ in range(samples)]
    sampled = replies(model, fmt, prompts, max_new_tokens, temperature=1.0, seed=seed)
    rng = random.Random(f"ranked-pairs/{seed}")
    pairs = []
    for i, e in enumerate(examples):
        candidates = sorted({e.answer, *sampled[i * samples:(i + 1) * samples]} - {""})
        scores = arithmetic_reward(candidates, [e.answer] * len(candidates), format_weight).tolist()
        ranked = [(a, b) if sa > sb else (b, a) for (a, sa), (b, sb)
                  in itertools.combinations(zip(candidates, scores), 2) if sa != sb]
        for chosen, rejected in rng.sample(ranked, min(pairs_per_question, len(ranked))):
            pairs.append(Pair(tuple(e.prompt), chosen, rejected))
    return pairs


def encode_pair_sides(pairs: list[Pair], fmt: ChatFormat, max_len: int) -> list[tuple[list[int], list[int], int]]:
    """(chosen ids, rejected ids, first) of each pair: the whole rendered conversations, end-of-turn
    included, and the index of their first reply token."""
    out = []
    for i, p in enumerate(pairs):
        check_pair(p, f"pair {i}")
        (chosen, mask), (rejected, _) = (fmt.render(conv, f"pair {i}") for conv in p.conversations())
        if max(len(chosen), len(rejected)) > max_len:
            raise ValueError(f"pair {i} renders to {max(len(chosen), len(rejected))} tokens, more than the {max_len} "
                             f"the reward model reads (--block-size); raise --block-size or shorten the replies")
        out.append((chosen, rejected, mask.index(True)))
    return out


def collate_sides(pairs: list[tuple[list[int], list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """chosen_ids / rejected_ids (n, W), right-padded; chosen_last / rejected_last (n,), each reply's
    last token; chosen_first / rejected_first (n,), its first."""
    rows = [c for c, _, _ in pairs] + [r for _, r, _ in pairs]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
    last = torch.tensor([len(row) - 1 for row in rows])
    first = torch.tensor([f for _, _, f in pairs] * 2)
    n = len(pairs)
    return {"chosen_ids": ids[:n], "rejected_ids": ids[n:], "chosen_last": last[:n], "rejected_last": last[n:],
            "chosen_first": first[:n], "rejected_first": first[n:]}


class SideBatches:
    """The loop's `sample_batch`: n pairs drawn at random from the split."""

    def __init__(self, train: list, val: list, pad_id: int):
        if not train or not val:
            raise ValueError(f"the reward model needs training and held-out pairs, got {len(train)} and {len(val)}")
        self.splits, self.pad_id = {"train": train, "val": val}, pad_id

    def __call__(self, split: str, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        pool = self.splits[split]
        return collate_sides([pool[int(i)] for i in torch.randint(len(pool), (n,), generator=generator)], self.pad_id)
