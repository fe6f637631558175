"""The naive cache with left padding: a row's result does not depend on the padding, and its waste is measured.

Reference: the same prompt alone, without padding (fp32 logits within 1e-5: only the summation
order of the softmax differs, over masked slots that contribute exact zeros).
"""

import torch

from inference.batched import BatchStats, generate_batch
from inference.kv_cache import NaiveKVCache
from inference.sampling import SamplingParams


def test_left_padding_does_not_change_a_row(model, prompts):
    short, long = prompts[0], prompts[1]  # 5 and 17 tokens
    cache = NaiveKVCache.for_model(model, 2, 20, pad=[12, 0])
    ids = torch.tensor([[0] * 12 + short, long])
    with torch.no_grad():
        batched = model(ids, cache=cache)[0, -1]
        step = model(torch.tensor([[7], [7]]), cache=cache)[0, -1]  # one decode step after the padded prefill
        alone_cache = NaiveKVCache.for_model(model, 1, 20)
        alone = model(torch.tensor([short]), cache=alone_cache)[0, -1]
        alone_step = model(torch.tensor([[7]]), cache=alone_cache)[0, -1]
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(step, alone_step, rtol=1e-5, atol=1e-5)


def test_static_batch_waste_is_measured(model, prompts):
    batch = [prompts[0], prompts[4]]  # 5 and 40 tokens
    stats = BatchStats()
    generate_batch(model, batch, SamplingParams(temperature=0.0, max_new_tokens=10), stats)
    capacity = 40 + 10
    assert stats.slots_allocated == 2 * capacity and stats.prefill_tokens == 2 * 40
    # At the prefill the cache holds 45 real tokens in 100 slots; after 9 decode passes, 63.
    assert stats.util_per_step[0] == 45 / 100 and stats.util_per_step[-1] == (45 + 2 * 9) / 100
    assert len(stats.util_per_step) == 10


def test_a_finished_row_keeps_its_slots_until_the_batch_ends(model, prompts):
    expected = generate_batch(model, prompts[:2], SamplingParams(temperature=0.0, max_new_tokens=10))
    stop = expected[0][1]  # row 0 stops after its second token; row 1 goes on to 10
    params = [SamplingParams(temperature=0.0, max_new_tokens=10, stop_token_ids=(stop,)),
              SamplingParams(temperature=0.0, max_new_tokens=10)]
    stats = BatchStats()
    out = generate_batch(model, prompts[:2], params, stats)
    assert out[0] == expected[0][:expected[0].index(stop) + 1] and out[1] == expected[1]
    assert len(stats.util_per_step) == 10, "the batch runs until its last row is done"
    assert stats.util_per_step[-1] == (17 + 9) / stats.slots_allocated, "row 0's slots hold nothing live"


def test_tokens_through_the_model_with_and_without_cache(model, prompts):
    """notes/kv-cache.md: nP + n(n-1)/2 positions without a cache, P + n - 1 with one."""
    from inference.sampling import generate

    seen = []
    # On the decoder stack: generation calls hidden_states and the head, not model(ids).
    hook = model.model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(args[0].numel()), with_kwargs=True)
    try:
        P, n = len(prompts[1]), 6
        params = SamplingParams(temperature=0.0, max_new_tokens=n)
        generate(model, prompts[1], params, use_cache=False)
        assert sum(seen) == n * P + n * (n - 1) // 2
        seen.clear()
        generate(model, prompts[1], params, use_cache=True)
        assert sum(seen) == P + n - 1
    finally:
        hook.remove()
