"""DPO's data: (prompt, chosen, rejected) triples, made offline or loaded, and their batches.

Preference datasets on the hub come as prompt/chosen/rejected columns, each a string or a list
of chat messages (the prompt's turns; the chosen and rejected assistant turns). `load_pairs`
reads both layouts from a local .json/.jsonl file or a hub name.

`arithmetic_pairs` makes pairs offline from the built-in arithmetic task (training/tasks.py):
the chosen reply is the right answer; the rejected one is the SFT model's own wrong answer when it
gives one (sampled at temperature 1: "on-policy", the mistakes this model actually makes, which
is what DPO has to push down), else a near miss (the answer off by 1, 10 or 100, or with two
digits swapped: a plausible mistake the model did not happen to make).

A batch holds both sides padded to one width, labels -100 outside the assistant's reply:
chosen_input_ids / chosen_labels / rejected_input_ids / rejected_labels, each (n, T).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from training.chat import ChatFormat, Message
from training.datafiles import local_or_hub_records
from training.sft.batch import Encoded, encode_all, pack


@dataclass(frozen=True)
class Pair:
    prompt: tuple  # the conversation up to the reply, as messages
    chosen: str  # the preferred assistant reply
    rejected: str  # the dispreferred one

    def conversations(self) -> tuple[list[Message], list[Message]]:
        return ([*self.prompt, {"role": "assistant", "content": self.chosen}],
                [*self.prompt, {"role": "assistant", "content": self.rejected}])


def check_pair(pair: Pair, where: str) -> None:
    if pair.chosen == pair.rejected:
        raise ValueError(f"{where}: chosen and rejected are the same reply ({pair.chosen[:60]!r}), so it prefers "
                         f"nothing; drop the row or fix its rejected reply")


PAIR_LAYOUT = ("'prompt' (a string, or a list of {'role', 'content'} turns), 'chosen' and 'rejected' (each a "
               "string, or a list of turns ending with the assistant's)")


def _reply(value, column: str, where: str) -> str:
    """A chosen/rejected cell: a string, or messages whose last turn is the assistant's."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and isinstance(value[-1], dict) and value[-1].get("role") == "assistant" \
            and isinstance(value[-1].get("content"), str):
        return value[-1]["content"]
    raise ValueError(f"{where}: {column} must be a string or a list of messages ending with an assistant turn, "
                     f"got {value!r:.60}")


def _prompt(value, where: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                 and isinstance(m.get("content"), str) for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise ValueError(f"{where}: prompt must be a string or a non-empty list of {{'role', 'content'}} turns, "
                     f"got {value!r:.60}")


def to_pair(record: dict, where: str = "record") -> Pair:
    missing = [c for c in ("prompt", "chosen", "rejected") if c not in record]
    if missing:
        raise ValueError(f"{where} has columns {sorted(record)}; a preference dataset needs prompt, chosen and "
                         f"rejected (missing {missing}): {PAIR_LAYOUT}")
    pair = Pair(tuple(_prompt(record["prompt"], where)), _reply(record["chosen"], "chosen", where),
                _reply(record["rejected"], "rejected", where))
    check_pair(pair, where)
    return pair


def load_pairs(source: str, split: str = "train") -> list[Pair]:
    """Preference pairs from a local .json/.jsonl file (read and checked by training/datafiles.py) or
    a hub dataset, through `datasets`."""
    from training.data import cache_dir

    records = local_or_hub_records(source, split, "preference data", f"each with {PAIR_LAYOUT}",
                                   cache_dir() / "datasets")
    return [to_pair(r, where) for where, r in records]


def near_miss(answer: str, rng: random.Random) -> str:
    """A wrong answer close to the right one."""
    n = int(answer)
    options = {str(n + d) for d in (-100, -10, -1, 1, 10, 100)}
    digits = answer.lstrip("-")
    if len(digits) >= 2 and digits[-1] != digits[-2]:
        options.add(answer[:-2] + digits[-1] + digits[-2])
    options.discard(answer)
    return rng.choice(sorted(options))


def arithmetic_pairs(model, fmt: ChatFormat, examples: list, seed: int = 0,
                     max_new_tokens: int = 8) -> tuple[list[Pair], int]:
    """(pairs, how many rejected replies are the model's own): one pair per example."""
    from training.tasks import replies  # sampling lives with the tasks' greedy replies

    sampled = replies(model, fmt, [e.prompt for e in examples], max_new_tokens, temperature=1.0, seed=seed)
    rng = random.Random(f"near-miss/{seed}")
    pairs, own = [], 0
    for e, got in zip(examples, sampled):
        wrong = got != e.answer and got != ""
        own += wrong
        pairs.append(Pair(tuple(e.prompt), e.answer, got if wrong else near_miss(e.answer, rng)))
    return pairs, own


def encode_pairs(pairs: list[Pair], fmt: ChatFormat, block_size: int) -> list[tuple[Encoded, Encoded]]:
    for i, p in enumerate(pairs):
        check_pair(p, f"pair {i}")
    chosen = encode_all([p.conversations()[0] for p in pairs], fmt, block_size, "chosen conversation")
    rejected = encode_all([p.conversations()[1] for p in pairs], fmt, block_size, "rejected conversation")
    return list(zip(chosen, rejected))


class PairBatches:
    """The loop's `sample_batch`: n pairs drawn at random from the split."""

    def __init__(self, train: list, val: list, block_size: int, pad_id: int):
        self.splits = {"train": train, "val": val}
        self.block_size, self.pad_id = block_size, pad_id

    def __call__(self, split: str, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        pool = self.splits[split]
        picked = [pool[int(i)] for i in torch.randint(len(pool), (n,), generator=generator)]
        return collate(picked, self.block_size, self.pad_id)


def collate(pairs: list[tuple[Encoded, Encoded]], block_size: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Both sides padded to one width, so that one forward pass computes them together."""
    both = pack([[c] for c, _ in pairs] + [[r] for _, r in pairs], block_size, pad_id, packed=False)
    n = len(pairs)
    return {"chosen_input_ids": both["input_ids"][:n], "chosen_labels": both["labels"][:n],
            "rejected_input_ids": both["input_ids"][n:], "rejected_labels": both["labels"][n:]}
