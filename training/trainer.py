"""The one training loop of the zoo, shared by every architecture and every method.

It knows nothing about language models: it takes a model, a loss function
`loss_fn(model, batch) -> (loss, metrics)`, a batch sampler and a `TrainConfig`.
Pretraining, SFT, LoRA, DPO, distillation and GRPO differ in the batches they sample, the loss
they compute and the hooks below, so they call this loop instead of copying it.

What it does, in order of a step: sample the global batch as a pure function of
(seed, step) -> take this process's rows -> micro-steps under bf16 autocast with gradient
accumulation (DDP syncs gradients on the last micro-step only) -> clip -> AdamW ->
warmup + cosine learning rate -> `on_step`. Around it: periodic evaluation, metrics to JSONL,
a loss curve, atomic checkpoints and exact resume (see training/checkpointing.py).
Because batches depend only on (seed, step), a resumed run and a run on N processes see
exactly the batches an uninterrupted single-process run sees.

The hooks a method plugs in, all keyword arguments of `train`:
- `make_optimizer(model, cfg, device) -> optimizer` replaces the default AdamW (LoRA hands it
  the adapters only); the warm-up + cosine schedule wraps whatever it returns.
- `on_step(step, model)` runs after every optimizer step, `step` counting completed steps from 1
  (a router's bias update, a weight average). Under DDP/FSDP every process calls it.
- `frozen={"reference": ref_model}`: models the loss reads but nothing trains (DPO's reference,
  distillation's teacher). Each is moved to the device, cast to the trained model's parameter
  dtype (so both run the same arithmetic under the same autocast: a reference that starts as a
  copy of the model computes exactly what the model computes), put in eval mode with
  requires_grad off, and under FSDP sharded like the trained model (under DDP it is only moved).
  It is in no optimizer and no checkpoint. With `frozen` given, the loop calls
  `loss_fn(model, batch, frozen)`: the third argument maps each name to its prepared model,
  which the loss calls under torch.no_grad().
- `TrainConfig.loss_chunk`: a loss that takes a `chunk_size` keyword (`lm_loss`, `sft_loss`) is
  called with it, and computes the output head and cross-entropy that many tokens at a time.
- Normalising by supervised tokens: a loss whose rows hold different numbers of targets (SFT
  masks the prompt with -100) returns the SUM of its per-token losses and puts how many tokens
  it summed in its metrics under "num_tokens" (`NUM_TOKENS`). The loop then divides the step's
  gradient by the supervised tokens of the whole step, all micro-batches of all processes, so
  every token weighs the same however the rows fall into micro-batches, and it logs that
  token-weighted mean as the loss. A loss that returns a mean (no "num_tokens") is averaged
  over micro-batches, which is the same thing when every row has as many targets (`lm_loss`).
Throughput (`tokens_per_s`) counts the tokens that train: the "num_tokens" a loss reports, else
the targets of the batch (y of an (x, y) batch).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping

import torch
from torch import nn
from tqdm import tqdm

from training import checkpointing
from architectures.utils.device import compute_dtype, resolve_device
from training.distributed import STRATEGIES, Distributed

# Dense bf16 peak of the GPUs we report MFU on (FLOP/s), from the vendors' data sheets.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}

# The metrics key by which a loss says it returned a SUM over this many supervised tokens.
NUM_TOKENS = "num_tokens"


@dataclass
class TrainConfig:
    max_steps: int = 1000  # optimizer steps
    batch_size: int = 32  # sequences per optimizer step, over all processes and micro-steps (the global batch)
    grad_accum_steps: int = 1  # micro-steps per optimizer step on each process
    block_size: int = 128  # tokens per training sequence
    lr: float = 1e-3  # peak learning rate, reached at the end of warm-up
    min_lr: float = 1e-4  # learning rate at the end of the cosine decay
    warmup_steps: int = 100  # linear warm-up from 0 to lr
    weight_decay: float = 0.1  # AdamW decoupled decay, applied to matrices only
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # AdamW second-moment decay
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 disables)
    eval_interval: int = 250  # evaluate every this many steps (and at the end)
    eval_batches: int = 20  # validation batches per evaluation (the same batches every time)
    log_interval: int = 10  # read the loss back from the device every this many steps
    checkpoint_interval: int = 0  # save a resumable checkpoint every this many steps (0: only at the end)
    seed: int = 1337  # seeds the model init, dropout and the batch order
    device: str = "auto"  # "auto" (cuda if present, else cpu), "cpu", "cuda", "cuda:1", ...
    dtype: str = "auto"  # "auto" (bf16 autocast on cuda, fp32 on cpu), "bf16" or "fp32"
    compile: bool = False  # torch.compile the model
    parallel: str = "ddp"  # under torchrun: "ddp" (replicate the model) or "fsdp" (FSDP2: shard it)
    activation_checkpointing: bool = False  # recompute each block's activations in backward: less memory, ~30% more compute
    profile: bool = False  # write a torch profiler trace of a few steps to OUT/profile.json
    loss_chunk: int = 0  # tokens per chunk of the output head + cross-entropy, never holding all logits at once (0: all at once)


# Fields that may differ when a run is resumed: they do not change what has been computed so far.
RESUMABLE_CHANGES = {"max_steps", "eval_interval", "eval_batches", "log_interval", "checkpoint_interval",
                     "device", "compile", "parallel", "activation_checkpointing", "profile", "loss_chunk"}


def validate(cfg: TrainConfig, world_size: int) -> None:
    for name in ("max_steps", "batch_size", "grad_accum_steps", "block_size", "eval_interval", "log_interval",
                 "eval_batches"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(cfg, name)}")
    for name, meaning in (("warmup_steps", "0: no warm-up"), ("checkpoint_interval", "0: only at the end"),
                          ("grad_clip", "0: no clipping")):
        if getattr(cfg, name) < 0:
            raise ValueError(f"TrainConfig.{name} must be >= 0 ({meaning}), got {getattr(cfg, name)}")
    if cfg.loss_chunk < 0:
        raise ValueError(f"TrainConfig.loss_chunk must be >= 0 (0: the whole head at once), got {cfg.loss_chunk}")
    if cfg.batch_size % (world_size * cfg.grad_accum_steps):
        raise ValueError(
            f"batch_size={cfg.batch_size} is not divisible by world_size x grad_accum_steps = "
            f"{world_size} x {cfg.grad_accum_steps}; choose a batch size that is a multiple of "
            f"{world_size * cfg.grad_accum_steps}"
        )
    if cfg.dtype not in ("auto", "bf16", "fp32"):
        raise ValueError(f"dtype must be 'auto', 'bf16' or 'fp32', got {cfg.dtype!r}")
    if cfg.parallel not in STRATEGIES:
        raise ValueError(f"parallel strategy must be one of {STRATEGIES}, got {cfg.parallel!r}")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to cfg.min_lr at max_steps. step counts from 0."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (>= 2-D) only: decaying norm gains and biases hurts."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")


default_optimizer = make_optimizer  # train()'s keyword argument of the same name shadows it


def map_tensors(fn: Callable[[torch.Tensor], torch.Tensor], batch: Any) -> Any:
    """Apply fn to every tensor of a batch that is a tensor, or a tuple/list/dict of tensors."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, dict):
        return {k: map_tensors(fn, v) for k, v in batch.items()}
    return type(batch)(map_tensors(fn, v) for v in batch)


def slice_batch(batch: Any, start: int, stop: int) -> Any:
    """Rows [start, stop) of every tensor of a batch."""
    return map_tensors(lambda t: t[start:stop], batch)


def pin_batch(batch: Any, device: torch.device) -> Any:
    """Page-locked host copies, which a GPU copies from asynchronously (no-op for a CPU run)."""
    if device.type != "cuda":
        return batch
    return map_tensors(lambda t: t.pin_memory() if t.device.type == "cpu" else t, batch)


def move_batch(batch: Any, device: torch.device) -> Any:
    """Enqueue the copy to the device; from pinned memory it returns before the copy has run."""
    return map_tensors(lambda t: t.to(device, non_blocking=t.is_pinned()), batch)


def target_tokens(batch: Any) -> int:
    """Tokens a batch trains on when its loss does not count them: the targets y of an (x, y)
    batch, the "labels" or "targets" of a dict batch, else every element of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return batch.numel()
    if isinstance(batch, dict):
        key = next((k for k in ("labels", "targets") if k in batch), next(iter(batch)))
        return target_tokens(batch[key])
    return target_tokens(batch[1] if len(batch) == 2 else batch[0])


def batch_generator(seed: int, split: str, step: int) -> torch.Generator:
    """The RNG a batch is drawn with: a pure function of (seed, split, step)."""
    # Train steps take the even streams and validation batches the odd ones, so they never coincide.
    return torch.Generator().manual_seed((seed * 1_000_003 + 2 * step + (split == "val")) % 2**63)


def prepare_frozen(frozen: Mapping[str, nn.Module], model: nn.Module, device: torch.device,
                   dd: Distributed) -> Mapping[str, nn.Module]:
    """Each frozen model on the device, in the trained model's dtype, in eval mode, without
    gradients, and under FSDP sharded like the trained model. Returns a read-only name -> model map."""
    trained = {id(p) for p in model.parameters()}
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    ready = {}
    for name, m in frozen.items():
        if not isinstance(m, nn.Module):
            raise TypeError(f"frozen[{name!r}] must be an nn.Module, got {type(m).__name__}")
        if any(id(p) in trained for p in m.parameters()):
            raise ValueError(f"frozen model {name!r} shares parameters with the model being trained, so freezing it "
                             f"would freeze the model too; pass a copy (copy.deepcopy(model))")
        m.to(device=device, dtype=dtype)
        m.eval()
        m.requires_grad_(False)
        # FSDP2 shards it like the trained model (each process holds 1/N); DDP has nothing to
        # synchronise for a model without gradients, so under DDP it stays a plain replica.
        if dd.enabled and dd.strategy == "fsdp":
            m = dd.wrap(m)
            # FSDP2 keeps the root's weights (embedding, head) gathered after the forward, for the
            # backward that follows; a frozen model has no backward, so it gives them back at once.
            m.set_reshard_after_forward(True)
        ready[name] = m
    return MappingProxyType(ready)


def call_loss(loss_fn: Callable, model: nn.Module, batch: Any, frozen: Mapping[str, nn.Module] | None):
    """(loss, metrics, supervised tokens or None): the loss function's answer, with the frozen
    models as its third argument when there are any, and NUM_TOKENS taken out of the metrics."""
    loss, metrics = loss_fn(model, batch, frozen) if frozen else loss_fn(model, batch)
    if NUM_TOKENS not in metrics:
        return loss, metrics, None
    metrics = dict(metrics)
    count = metrics.pop(NUM_TOKENS)
    return loss, metrics, torch.as_tensor(count, device=loss.device).detach().float()


@dataclass
class TrainResult:
    step: int  # optimizer steps completed
    train_loss: float  # last logged training loss
    val_loss: float | None  # last validation loss
    elapsed_s: float  # wall time of the training steps (evaluation and compile warm-up included)
    metrics_path: Path | None


def train(
    model: nn.Module,
    loss_fn: Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]],
    sample_batch: Callable[[str, int, torch.Generator], Any],
    cfg: TrainConfig,
    out_dir: str | Path | None = None,
    *,
    save_model: Callable[[nn.Module, Path, dict | None], None] | None = None,
    config_record: dict | None = None,
    resume: bool = False,
    val_units_per_token: float | None = None,
    flops_per_token: float | None = None,
    on_log: Callable[[dict], None] | None = None,
    make_optimizer: Callable[[nn.Module, TrainConfig, torch.device], torch.optim.Optimizer] | None = None,
    on_step: Callable[[int, nn.Module], None] | None = None,
    frozen: Mapping[str, nn.Module] | None = None,
    loss_label: str = "train loss",
) -> TrainResult:
    """Train `model` in place. `sample_batch(split, n, generator)` returns n examples of split
    "train" or "val"; `save_model(model, dir, state_dict)` writes the weights/config/tokenizer
    files of a checkpoint (without it, no checkpoint is written); `config_record` is everything
    a resumed run must agree with; `val_units_per_token` converts validation nats/token to nats per character;
    `on_log(entry)` sees every metrics entry as it is logged (benchmarks read them there);
    `loss_label` names the training loss in the terminal ("train loss (lm + aux)").
    `make_optimizer`, `on_step` and `frozen` are the methods' hooks (module docstring)."""
    dd = Distributed.from_env(cfg.parallel)
    validate(cfg, dd.world_size)
    device = resolve_device(cfg.device) if not dd.enabled or dd.device is None else dd.device
    autocast_dtype = compute_dtype(cfg.dtype, device)
    autocast_dtype = autocast_dtype if autocast_dtype != torch.float32 else None  # fp32: no autocast
    if cfg.compile and not hasattr(torch, "compile"):
        raise RuntimeError(f"--compile needs torch >= 2.0 with torch.compile; this is torch {torch.__version__}")
    if cfg.activation_checkpointing:
        if not hasattr(model, "gradient_checkpointing"):
            raise ValueError(f"{type(model).__name__} does not support activation checkpointing")
        model.gradient_checkpointing = True
    torch.manual_seed(cfg.seed)
    model.to(device)
    frozen = prepare_frozen(frozen, model, device, dd) if frozen else None
    wrapped = dd.wrap(model)  # DDP wrapper, or `model` itself sharded in place by FSDP2
    # The optimizer is built after sharding: under FSDP2 it must hold (and update) the local shards.
    optimizer = (make_optimizer or default_optimizer)(model, cfg, device)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"make_optimizer must return a torch.optim.Optimizer, got {type(optimizer).__name__}")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, cfg) / cfg.lr)
    out = Path(out_dir) if out_dir is not None else None
    record = {"train": vars(cfg).copy(), **(config_record or {})}
    start_step, history, window = 0, [], None
    if resume:
        if out is None:
            raise ValueError("resume needs an output directory holding the checkpoint")
        start_step, history, window = checkpointing.load(out, model, optimizer, scheduler, record,
                                                          RESUMABLE_CHANGES, dd)
    elif out is not None:
        if dd.is_main:
            checkpointing.start_fresh(out)
        dd.barrier()
    last_checkpoint = start_step if resume else None
    if cfg.loss_chunk:
        if "chunk_size" not in inspect.signature(loss_fn).parameters:
            raise ValueError(f"loss_chunk={cfg.loss_chunk}: the loss {getattr(loss_fn, '__name__', loss_fn)!r} applies "
                             f"the output head itself and takes no chunk_size; train it with loss_chunk 0")
        loss_fn = functools.partial(loss_fn, chunk_size=cfg.loss_chunk)
    # Compiling the loss function compiles the model inside it too, and lets the compiler fuse
    # the output head, the fp32 upcast and the cross-entropy instead of materialising fp32 logits.
    step_loss = torch.compile(loss_fn) if cfg.compile else loss_fn
    profiler = start_profiler(out, device) if cfg.profile and dd.is_main else None

    per_rank = cfg.batch_size // dd.world_size
    micro = per_rank // cfg.grad_accum_steps
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if device.type == "cuda" and k in torch.cuda.get_device_name(device)), None)
    metrics_file = open(out / "metrics.jsonl", "a") if (out is not None and dd.is_main) else None
    # The log window: what accumulates on the device between two log lines. A checkpoint saves
    # it and a resume restores it, so the first line after a resume averages the same steps as
    # the uninterrupted run's, wherever the checkpoint fell.
    bad_step = torch.full((), -1, dtype=torch.long, device=device)  # first step with a non-finite loss, read at log time
    loss_sum = torch.zeros((), device=device)
    extra_sums: dict[str, torch.Tensor] = {}
    steps_since_log = 0
    if window is not None:
        bad_step, loss_sum = window["bad_step"].to(device), window["loss_sum"].to(device)
        extra_sums = {k: v.to(device) for k, v in window["extra_sums"].items()}
        steps_since_log = window["steps"]
    last_train = next((e for e in reversed(history) if "loss" in e), {"loss": float("nan"), "step": None})
    train_loss, train_loss_step = last_train["loss"], last_train["step"]
    val_loss = None
    interactive = sys.stderr.isatty() and dd.is_main
    bar = tqdm(total=cfg.max_steps, initial=start_step, disable=not interactive, dynamic_ncols=True)
    t0 = time.perf_counter()
    eval_s = warmup_s = 0.0  # time in evaluation, and in the first step (which compiles, if --compile)
    t_log, tokens_since_log, data_s = time.perf_counter(), 0, 0.0

    def log(entry: dict) -> None:
        history.append(entry)
        if on_log is not None and dd.is_main:
            on_log(entry)
        if metrics_file is not None:
            metrics_file.write(json.dumps(entry) + "\n")
            metrics_file.flush()

    def say(line: str) -> None:
        """A line for the person at the terminal, written above the progress bar if there is one."""
        if dd.is_main:
            (tqdm.write if interactive else print)(line)
            sys.stdout.flush()

    def check_finite() -> None:
        if int(bad_step) >= 0:
            saved = (f"the last checkpoint, of step {last_checkpoint}, in {out}, holds the parameters from before it"
                     if last_checkpoint is not None else "no checkpoint was saved yet")
            raise FloatingPointError(
                f"loss became NaN or inf at step {int(bad_step) + 1}; lower --lr, enable --grad-clip, "
                f"or check the data ({saved})"
            )

    model.train()
    for step in range(start_step, cfg.max_steps):
        # Sampling and the (pinned, non-blocking) copy run on the host while the GPU still works
        # through the previous step's queued kernels: the batch is prefetched without a thread.
        t_data = time.perf_counter()
        batch = sample_batch("train", cfg.batch_size, batch_generator(cfg.seed, "train", step))
        rows = slice_batch(batch, dd.rank * per_rank, (dd.rank + 1) * per_rank)
        pinned = [pin_batch(slice_batch(rows, i * micro, (i + 1) * micro), device) for i in range(cfg.grad_accum_steps)]
        # data_s is the host's own work on the batch. The copies are enqueued outside it: when the
        # host runs ahead of the GPU, enqueueing waits for room in the queue, which is GPU time.
        data_s += time.perf_counter() - t_data
        micro_batches = [move_batch(mb, device) for mb in pinned]
        token_sum, counts = torch.zeros((), device=device), []  # summed losses and their token counts
        for micro_step, mb in enumerate(micro_batches):
            last = micro_step == cfg.grad_accum_steps - 1
            # The backward must run inside no_sync too: FSDP2 decides in its backward hooks.
            with contextlib.nullcontext() if last else dd.no_sync(wrapped):
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    loss, extras, count = call_loss(step_loss, wrapped, mb, frozen)
                if micro_step > 0 and (count is not None) != bool(counts):
                    raise ValueError(f"the loss function reported '{NUM_TOKENS}' for some micro-batches of step "
                                     f"{step + 1} and not for others; report it always (then the loss is a sum) or never")
                if count is None:
                    (loss / cfg.grad_accum_steps).backward()
                    loss_sum += loss.detach() / cfg.grad_accum_steps
                    tokens_since_log += target_tokens(mb) * dd.world_size
                else:
                    loss.backward()  # a sum: divided below by the whole step's token count
                    token_sum += loss.detach().float()
                    counts.append(count)
            for k, v in extras.items():
                extra_sums[k] = extra_sums.get(k, 0) + v.detach().float() / cfg.grad_accum_steps
        if counts:
            # DDP and FSDP2 average gradients over processes; times world_size / (tokens of the
            # whole step, every process) turns that average of sums into the mean over tokens.
            step_tokens = dd.mean(torch.stack(counts).sum()) * dd.world_size
            scale = dd.world_size / step_tokens.clamp_min(1)
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(scale)
            loss_sum += token_sum * scale  # the processes' shares add up (dd.mean below) to the token mean
            tokens_since_log = tokens_since_log + step_tokens
        bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss_sum), step, bad_step)
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        if on_step is not None:
            on_step(done, model)
        if profiler is not None:
            profiler.step()
        bar.update(1)
        if step == start_step:
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # once: so that the first step's time is its real time
            warmup_s = time.perf_counter() - t0
        steps_since_log += 1

        if done % cfg.log_interval == 0 or done == cfg.max_steps:
            # The only host-device synchronisation of the step: read what accumulated since the last log.
            n = steps_since_log
            loss_avg = dd.mean(loss_sum / n)
            check_finite()
            dt = time.perf_counter() - t_log
            train_loss, train_loss_step = float(loss_avg), done
            tokens = float(tokens_since_log)
            entry = {"step": done, "lr": scheduler.get_last_lr()[0], "loss": train_loss,
                     "grad_norm": float(dd.mean(grad_norm) if hasattr(grad_norm, "full_tensor") else grad_norm),
                     "tokens": tokens, "tokens_per_s": tokens / dt, "data_fraction": data_s / dt}
            if device.type == "cuda":
                entry["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                # Between steps (activations and gradients freed): parameters + AdamW moments
                # (+ DDP's gradient buckets), the memory FSDP2 divides across GPUs.
                entry["state_memory_gb"] = torch.cuda.memory_allocated(device) / 2**30
            if flops_per_token and peak:
                entry["mfu"] = tokens * flops_per_token / dt / (peak * dd.world_size)
            entry.update({k: float(dd.mean(v / n)) for k, v in extra_sums.items()})
            log(entry)
            bar.set_postfix({loss_label: f"{train_loss:.4f}"})
            loss_sum = torch.zeros((), device=device)
            extra_sums = {}
            t_log, tokens_since_log, steps_since_log, data_s = time.perf_counter(), 0, 0, 0.0

        if done % cfg.eval_interval == 0 or done == cfg.max_steps:
            t_eval = time.perf_counter()
            val_loss = evaluate(model, loss_fn, sample_batch, cfg, device, autocast_dtype, dd, frozen)
            eval_s += time.perf_counter() - t_eval
            now = time.perf_counter() - t0
            # train_s: time in training steps alone, without evaluation and without the first
            # step (compilation), the figure "time to reach a validation loss" is measured in.
            entry = {"step": done, "val_loss": val_loss, "elapsed_s": now, "train_s": now - eval_s - warmup_s}
            if val_units_per_token:
                entry["val_nats_per_char"] = val_loss * val_units_per_token
            log(entry)
            extra = f", {entry['val_nats_per_char']:.4f} nats/char" if "val_nats_per_char" in entry else ""
            # The training loss is read every log_interval steps: say which step it is from when
            # that is not this one, and leave it out before the first.
            trained = "" if train_loss_step is None else f"{loss_label} {train_loss:.4f}" + (
                f" (at step {train_loss_step})" if train_loss_step != done else "") + ", "
            say(f"step {done}/{cfg.max_steps}: {trained}val loss {val_loss:.4f}{extra}")
            t_log = time.perf_counter()  # evaluation time is not training throughput

        if out is not None and save_model is not None and (
                (cfg.checkpoint_interval and done % cfg.checkpoint_interval == 0) or done == cfg.max_steps):
            check_finite()  # a checkpoint never holds parameters a non-finite loss has updated
            window = {"loss_sum": dd.mean(loss_sum).cpu(), "steps": steps_since_log, "bad_step": bad_step.cpu(),
                      "extra_sums": {k: dd.mean(v).cpu() for k, v in extra_sums.items()}}
            checkpointing.save(out, model, optimizer, scheduler, done, record, save_model, dd, loop_state=window)
            last_checkpoint = done
            if dd.is_main:
                checkpointing.plot_losses(history, out / "loss.png")
    bar.close()
    if profiler is not None:
        profiler.stop()
    if metrics_file is not None:
        metrics_file.close()
    elapsed = time.perf_counter() - t0
    dd.close()
    return TrainResult(cfg.max_steps, train_loss, val_loss, elapsed, out / "metrics.jsonl" if out else None)


def start_profiler(out: Path | None, device: torch.device):
    """Trace steps 3-5 (after warm-up and compilation) to OUT/profile.json, viewable in Perfetto."""
    from torch.profiler import ProfilerActivity, profile, schedule

    if out is None:
        raise ValueError("--profile needs --out: the trace is written there")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    prof = profile(activities=activities, schedule=schedule(wait=1, warmup=1, active=3, repeat=1),
                   on_trace_ready=lambda p: p.export_chrome_trace(str(out / "profile.json")))
    prof.start()
    return prof


@torch.no_grad()
def evaluate(model, loss_fn, sample_batch, cfg: TrainConfig, device, autocast_dtype, dd: Distributed,
             frozen: Mapping[str, nn.Module] | None = None) -> float:
    """Mean loss over cfg.eval_batches validation batches, the same batches at every evaluation
    (per supervised token when the loss reports "num_tokens", else per batch)."""
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), device=device), torch.zeros((), device=device)
    micro = cfg.batch_size // (dd.world_size * cfg.grad_accum_steps)
    for i in range(cfg.eval_batches):
        batch = sample_batch("val", micro, batch_generator(cfg.seed, "val", i))
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss, _, tokens = call_loss(loss_fn, model, move_batch(pin_batch(batch, device), device), frozen)
        total += loss.float()
        count += 1 if tokens is None else tokens
    model.train(was_training)
    return float(total / count.clamp_min(1))
