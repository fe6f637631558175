"""The loop's hooks for post-training methods: an optimizer factory, a per-step callback, frozen
models the loss reads, and losses normalised by the supervised tokens of the whole step."""

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from architectures.llama3 import from_pretrained, save_pretrained
from architectures.common.loss import lm_loss
from training.batches import batch_generator
from training.loss_protocol import NUM_TOKENS
from training.optimizer import lr_at, make_optimizer
from training.trainer import train

sys.path.insert(0, str(Path(__file__).parent))
from toy import BLOCK, config, masked_batch, sample_batch, tiny_model  # noqa: E402


def entries(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def sgd(model, cfg, device):
    """Plain SGD: one step moves each parameter by exactly -lr x its gradient."""
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)


# ---------------------------------------------------------------------------- optimizer factory


def test_optimizer_factory_replaces_adamw_and_the_schedule_wraps_it():
    made = []

    def head_only(model, cfg, device):
        # What LoRA does with its adapters: only some parameters train.
        made.append(torch.optim.SGD(model.lm_head.parameters(), lr=cfg.lr))
        return made[-1]

    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = config(max_steps=4)
    train(model, lm_loss, sample_batch, cfg, None, make_optimizer=head_only)
    assert len(made) == 1
    # The warm-up + cosine schedule drives the factory's optimizer too.
    assert made[0].param_groups[0]["lr"] == pytest.approx(lr_at(cfg.max_steps, cfg))
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) != name.startswith("lm_head"), name


def test_optimizer_factory_must_return_an_optimizer():
    with pytest.raises(TypeError, match="must return a torch.optim.Optimizer, got list"):
        train(tiny_model(), lm_loss, sample_batch, config(max_steps=1), None,
              make_optimizer=lambda model, cfg, device: list(model.parameters()))


# ---------------------------------------------------------------------------- on_step


def test_on_step_runs_after_every_optimizer_step_with_the_updated_model():
    model = tiny_model()
    start = model.lm_head.weight.detach().clone()
    calls = []
    train(model, lm_loss, sample_batch, config(max_steps=3, log_interval=2), None,
          on_step=lambda step, m: calls.append((step, m is model, not torch.equal(m.lm_head.weight, start))))
    assert calls == [(1, True, True), (2, True, True), (3, True, True)]


# ---------------------------------------------------------------------------- frozen models


def test_frozen_reference_is_prepared_read_by_the_loss_and_never_trained(tmp_path):
    """DPO's situation: the reference starts as a copy of the model. Prepared by the loop, it
    computes exactly what the model computes at step 1 (same dtype, same autocast), then stays
    where it was while the model moves; it is in no optimizer and no checkpoint."""
    model = tiny_model(dropout=0.1)
    reference = copy.deepcopy(model).train()  # eval mode must come from the loop (dropout off)
    frozen_start = {n: p.detach().clone() for n, p in reference.named_parameters()}
    seen, optimizers = [], []

    def loss_with_reference(model, batch, frozen):
        ref = frozen["reference"]
        x, _ = batch
        with torch.no_grad():
            gap = (model(x) - ref(x)).abs().max().item() if not model.training else None
        seen.append({"eval": not ref.training, "no_grad": not any(p.requires_grad for p in ref.parameters()),
                     "gap": gap, "training": model.training})
        return lm_loss(model, batch)

    def adamw_recorded(model, cfg, device):
        optimizers.append(make_optimizer(model, cfg, device))
        return optimizers[-1]

    train(model, loss_with_reference, sample_batch, config(max_steps=4, eval_interval=2, eval_batches=1), tmp_path,
          save_model=save_pretrained, frozen={"reference": reference}, make_optimizer=adamw_recorded)
    assert all(s["eval"] and s["no_grad"] for s in seen)
    evals = [s["gap"] for s in seen if not s["training"]]
    assert len(evals) == 2 and all(gap > 0 for gap in evals)  # the model has moved away from the reference
    for n, p in reference.named_parameters():
        assert torch.equal(p, frozen_start[n]), n
    frozen_ids = {id(p) for p in reference.parameters()}
    assert not frozen_ids & {id(p) for g in optimizers[0].param_groups for p in g["params"]}
    saved = from_pretrained(tmp_path)
    assert len(saved.state_dict()) == len(model.state_dict())  # the checkpoint holds the model alone


def test_frozen_model_identical_to_the_model_gives_identical_logits_in_the_first_step():
    model = tiny_model()
    gaps = []

    def loss_fn(model, batch, frozen):
        x, _ = batch
        with torch.no_grad():
            gaps.append((model(x) - frozen["reference"](x)).abs().max().item())
        return lm_loss(model, batch)

    train(model, loss_fn, sample_batch, config(max_steps=2, eval_interval=10), None,
          frozen={"reference": copy.deepcopy(model)})
    assert gaps[0] == 0.0 and gaps[1] > 0.0


def test_frozen_model_is_cast_to_the_trained_models_dtype():
    teacher = tiny_model(seed=1).to(torch.bfloat16)
    dtypes = []

    def loss_fn(model, batch, frozen):
        dtypes.append({p.dtype for p in frozen["teacher"].parameters()})
        return lm_loss(model, batch)

    train(tiny_model(), loss_fn, sample_batch, config(max_steps=1), None, frozen={"teacher": teacher})
    assert dtypes[0] == {torch.float32}


def test_freezing_the_model_itself_is_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match="shares parameters with the model being trained.*copy.deepcopy"):
        train(model, lm_loss, sample_batch, config(max_steps=1), None, frozen={"reference": model})
    assert all(p.requires_grad for p in model.parameters())


# ---------------------------------------------------------------------------- token-normalised losses


def summed_loss(model, batch):
    """Cross-entropy SUMMED over the supervised targets, with their count: the loop divides."""
    x, y = batch
    total = F.cross_entropy(model(x).float().flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum")
    return total, {NUM_TOKENS: (y != -100).sum()}


def mean_loss(model, batch):
    """The same loss as a mean per micro-batch: what a loss without the hook would return."""
    x, y = batch
    return F.cross_entropy(model(x).float().flatten(0, 1), y.flatten(), ignore_index=-100), {}


def one_sgd_step_on_the_whole_batch(cfg):
    """The reference: the token mean over all 8 rows at once, and the parameters after one SGD step on it."""
    model = tiny_model()
    x, y = masked_batch("train", cfg.batch_size, batch_generator(cfg.seed, "train", 0))
    total, metrics = summed_loss(model, (x, y))
    loss = total / metrics[NUM_TOKENS]
    loss.backward()
    with torch.no_grad():
        return loss.item(), {n: p - cfg.lr * p.grad for n, p in model.named_parameters()}


def test_accumulated_micro_batches_of_unequal_token_counts_equal_one_batch(tmp_path):
    """Each supervised token weighs the same however the rows fall into micro-batches: one step
    with grad_accum_steps=2 (16 and 48 supervised targets) moves the parameters exactly as one
    step on the whole batch, and logs the whole batch's token-mean loss. SGD without clipping
    makes the step -lr x gradient, so parameters compare gradients; fp32 summation order
    differs, hence rtol 1e-5."""
    cfg = config(max_steps=1, batch_size=8, grad_accum_steps=2, warmup_steps=0, grad_clip=0.0, lr=0.5,
                 eval_interval=10)
    expected_loss, expected = one_sgd_step_on_the_whole_batch(cfg)
    model = tiny_model()
    train(model, summed_loss, masked_batch, cfg, tmp_path, make_optimizer=sgd)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, expected[n], rtol=1e-5, atol=1e-6, msg=n)
    logged = [e for e in entries(tmp_path) if "loss" in e][0]
    assert logged["loss"] == pytest.approx(expected_loss, rel=1e-6)
    assert logged["tokens"] == 16 + 48  # throughput counts the supervised tokens, not the 8 x 16 inputs

    # The mean of the two micro-batches' means weighs a token of rows 0-3 three times as much:
    # a visibly different step, which is what the hook exists to avoid.
    naive = tiny_model()
    train(naive, mean_loss, masked_batch, cfg, None, make_optimizer=sgd)
    assert max((p - expected[n]).abs().max().item() for n, p in naive.named_parameters()) > 1e-3


def test_validation_loss_is_the_token_mean_too(tmp_path):
    cfg = config(max_steps=1, eval_interval=1, eval_batches=3)
    model = tiny_model()
    train(model, summed_loss, masked_batch, cfg, tmp_path)
    model.eval()
    total = count = 0
    with torch.no_grad():
        for i in range(cfg.eval_batches):
            s, m = summed_loss(model, masked_batch("val", cfg.batch_size, batch_generator(cfg.seed, "val", i)))
            total, count = total + s.item(), count + m[NUM_TOKENS].item()
    logged = [e for e in entries(tmp_path) if "val_loss" in e][0]
    assert logged["val_loss"] == pytest.approx(total / count, rel=1e-6)


def test_throughput_counts_the_targets_of_an_input_target_batch(tmp_path):
    cfg = config(max_steps=2, log_interval=2)
    train(tiny_model(), lm_loss, sample_batch, cfg, tmp_path)
    assert [e["tokens"] for e in entries(tmp_path) if "loss" in e] == [2 * cfg.batch_size * BLOCK]


def test_a_loss_that_counts_tokens_for_some_micro_batches_only_is_refused():
    calls = {"n": 0}

    def inconsistent(model, batch):
        calls["n"] += 1
        return summed_loss(model, batch) if calls["n"] == 1 else mean_loss(model, batch)

    with pytest.raises(ValueError, match="reported 'num_tokens' for some micro-batches of step 1"):
        train(tiny_model(), inconsistent, masked_batch, config(max_steps=1, grad_accum_steps=2), None)


# ---------------------------------------------------------------------------- loss_chunk


def test_loss_chunk_reaches_the_loss_and_trains_as_the_plain_loss_does():
    seen = []

    def chunked(model, batch, chunk_size=0):
        seen.append(chunk_size)
        return lm_loss(model, batch, chunk_size=chunk_size)

    plain, split = tiny_model(), tiny_model()
    train(plain, lm_loss, sample_batch, config(max_steps=2))
    train(split, chunked, sample_batch, config(max_steps=2, loss_chunk=7))
    assert seen and set(seen) == {7}  # every call, training and evaluation, got the chunk size
    # AdamW divides by the root of the squared gradient, so fp32 rounding in a near-zero gradient can
    # move an element by ~1e-6; a step taken differently would move it by ~lr = 3e-3.
    for a, b in zip(plain.parameters(), split.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_loss_chunk_with_a_loss_that_takes_no_chunk_size_is_refused():
    def whole_head(model, batch):
        return lm_loss(model, batch)

    with pytest.raises(ValueError, match="takes no chunk_size; train it with loss_chunk 0"):
        train(tiny_model(), whole_head, sample_batch, config(max_steps=1, loss_chunk=8))
