"""The built-in instruction set: tasks generated offline, deterministically, with held-out splits.

Every post-training demo and test runs on these, with no download:

- `arithmetic`: "What is 123 + 45?" -> "168". Addition and subtraction of whole numbers of one to
  three digits; the answer is exact, so a reply is right or wrong with no judge. DPO builds its
  preference pairs from it and GRPO its reward.
- `speaker`: a line of Tiny Shakespeare -> the character who speaks it, among the most frequent
  speakers: a task only a model that has read the play can do.

Held-out questions never appear in training. For arithmetic, a question belongs to the test
split when a hash of its text falls in one tenth of the range: the split is a property of the
question, so no two draws, seeds or sizes can put one question in both. For the speaker task,
lines are split the same way, by a hash of the question.

`exact_match` scores a model: greedy replies, compared with the answer after stripping spaces.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections import Counter
from dataclasses import dataclass

import torch

from training.chat import ChatFormat, Message
from training.data import split_text

SPLITS = ("train", "test")
HELD_OUT_BUCKETS = 10  # 1 in 10 arithmetic questions is a test question


@dataclass(frozen=True)
class Example:
    task: str  # "arithmetic" or "speaker"
    prompt: tuple  # the user's turn(s), as messages
    answer: str  # the exact expected reply

    def conversation(self) -> list[Message]:
        return list(self.prompt) + [{"role": "assistant", "content": self.answer}]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _held_out(question: str) -> bool:
    return int(hashlib.sha256(question.encode()).hexdigest(), 16) % HELD_OUT_BUCKETS == 0


def arithmetic_question(a: int, op: str, b: int) -> str:
    return f"What is {a} {op} {b}?"


def arithmetic(split: str, n: int, seed: int = 0, max_digits: int = 3) -> list[Example]:
    """n distinct questions of the split. Each operand has 1 to max_digits digits with equal chance
    (a uniform draw from 0..999 would be 90% three-digit numbers)."""
    _check_split(split)
    if not 1 <= max_digits <= 6:
        raise ValueError(f"max_digits must be between 1 and 6, got {max_digits}")
    total = 2 * (10 ** max_digits) ** 2  # (a, op, b) with a, b < 10^max_digits
    available = total // HELD_OUT_BUCKETS if split == "test" else total - total // HELD_OUT_BUCKETS
    if n > available // 2:  # drawing distinct questions gets slow as the split runs out
        raise ValueError(f"asked for {n:,} distinct {split} questions of up to {max_digits} digits, but the split has "
                         f"about {available:,}; ask for at most half of them, or allow more digits")
    rng = random.Random(f"arithmetic/{split}/{seed}/{max_digits}")
    seen, out = set(), []
    while len(out) < n:
        a, b = (rng.randrange(10 ** (d - 1) if d > 1 else 0, 10 ** d)
                for d in (rng.randint(1, max_digits), rng.randint(1, max_digits)))
        op = rng.choice("+-")
        q = arithmetic_question(a, op, b)
        if q in seen or _held_out(q) != (split == "test"):
            continue
        seen.add(q)
        out.append(Example("arithmetic", ({"role": "user", "content": q},), str(a + b if op == "+" else a - b)))
    return out


def speeches(text: str) -> list[tuple[str, str]]:
    """(speaker, first line) of every speech: Tiny Shakespeare's speeches are blank-line-separated
    blocks that open with "NAME:"."""
    out = []
    for block in text.split("\n\n"):
        lines = block.strip().split("\n")
        if len(lines) >= 2 and re.fullmatch(r"[A-Z][A-Za-z' ]*:", lines[0].strip()):
            out.append((lines[0].strip()[:-1], lines[1].strip()))
    return out


def speaker(text: str, split: str, n: int, seed: int = 0, num_speakers: int = 8) -> list[Example]:
    """Up to n "Who says this line?" questions about the `num_speakers` most frequent speakers of the
    training text (the first 90%, which the pretrained base has read: the task asks what it knows).
    Lines are split between train and test by a hash of their text, like arithmetic questions."""
    _check_split(split)
    train_text, _ = split_text(text)
    top = [s for s, _ in Counter(s for s, _ in speeches(train_text)).most_common(num_speakers)]
    if len(top) < 2:
        raise ValueError("the corpus has fewer than two speakers in 'NAME:' speeches; the speaker task needs Tiny "
                         "Shakespeare (or a play in its layout)")
    questions = {}
    for s, line in speeches(train_text):
        q = f"Who says: {line}"
        if s in top and len(line) > 10:
            questions.setdefault(q, set()).add(s)
    # A line two characters both say ("My lord,") has no single answer: it is left out.
    pool = sorted((q, next(iter(who))) for q, who in questions.items()
                  if len(who) == 1 and _held_out(q) == (split == "test"))
    random.Random(f"speaker/{split}/{seed}").shuffle(pool)
    return [Example("speaker", ({"role": "user", "content": q},), s) for q, s in pool[:n]]


@torch.no_grad()
def replies(model, fmt: ChatFormat, prompts: list, max_new_tokens: int = 8, batch_size: int = 64,
            temperature: float = 0.0, seed: int = 0) -> list[str]:
    """The model's reply to each prompt (a list of messages), decoded and stripped: greedy, or
    sampled at `temperature` (prompt i with seed + i, whatever batch it falls in)."""
    from inference.batched import generate_batch
    from inference.sampling import SamplingParams

    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(prompts), batch_size):
        ids = [fmt.prompt(list(p)) for p in prompts[i:i + batch_size]]
        params = [SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, stop_token_ids=fmt.stop_ids,
                                 seed=seed + i + j) for j in range(len(ids))]
        for tokens in generate_batch(model, ids, params):
            tokens = [t for t in tokens if t not in fmt.stop_ids]
            out.append(fmt.tokenizer.decode(tokens).strip())
    model.train(was_training)
    return out


def exact_match(model, fmt: ChatFormat, examples: list[Example], max_new_tokens: int = 8, batch_size: int = 64) -> float:
    """Fraction of examples whose greedy reply equals the answer exactly (spaces stripped)."""
    if not examples:
        raise ValueError("exact_match needs at least one example")
    got = replies(model, fmt, [e.prompt for e in examples], max_new_tokens, batch_size)
    return sum(g == e.answer for g, e in zip(got, examples)) / len(examples)
