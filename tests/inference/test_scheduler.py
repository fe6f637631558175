"""The scheduler's policy, step by step, without a model: first come first served, a token
budget per step, and preemption of the newest sequence when blocks run out."""

from inference.block_manager import BlockManager
from inference.sampling import SamplingParams
from inference.scheduler import Scheduler, Sequence


def seq(arrival: int, length: int) -> Sequence:
    return Sequence(str(arrival), 0, arrival, list(range(100 * arrival, 100 * arrival + length)), length,
                    SamplingParams(), None)


def decode(out) -> None:
    """What the engine does after a forward pass: every scheduled sequence gets one more token."""
    for q in out.seqs:
        q.num_computed = len(q.token_ids)
        q.token_ids.append(7)


def test_prompts_are_admitted_in_arrival_order_within_the_token_budget():
    s = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=10)
    a, b, c = seq(0, 6), seq(1, 6), seq(2, 3)
    for q in (a, b, c):
        s.add(q)
    out = s.schedule()
    # a (6) fits; b (6) would exceed 10 and c (3) may not jump the queue ahead of b.
    assert out.seqs == [a] and list(s.waiting) == [b, c] and out.num_prefill_tokens == 6
    decode(out)
    out = s.schedule()
    assert out.seqs == [a, b, c], "decodes first (1 token), then b and c: 1 + 6 + 3 = 10"


def test_a_prompt_longer_than_the_budget_runs_alone():
    s = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=8)
    long, short = seq(0, 20), seq(1, 2)
    s.add(long), s.add(short)
    out = s.schedule()
    assert out.seqs == [long] and list(s.waiting) == [short]


def test_out_of_blocks_preempts_the_newest_and_requeues_it_first():
    s = Scheduler(BlockManager(4, 2), max_num_seqs=8, max_num_batched_tokens=64)
    old, new = seq(0, 4), seq(1, 4)  # two full blocks each: the pool is full after admission
    s.add(old), s.add(new)
    decode(s.schedule())
    later = seq(2, 1)
    s.add(later)
    out = s.schedule()  # old needs a third block: new (the newest running) gives its two back
    assert out.preempted == [new] and out.seqs == [old]
    assert list(s.waiting) == [new, later], "the preempted sequence goes ahead of later arrivals"
    assert new.block_table == [] and new.num_computed == 0, "recompute: nothing of it stays in the cache"
    assert out.num_prefill_tokens == 0, "nothing is admitted in a step that had to preempt"
