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
exactly the batches an uninterrupted single-process run sees. `train` sets up a `Run` (what the
parts of a step share), then each step calls `next_batch`, `micro_step` per micro-batch and
`optimizer_step`, and every so often `log_training`, `log_validation` and `save_checkpoint`.

The hooks a method plugs in, all keyword arguments of `train`:
- `make_optimizer(model, cfg, device) -> optimizer` replaces the default AdamW (LoRA hands it
  the adapters only); the warm-up + cosine schedule wraps whatever it returns.
- `on_step(step, model)` runs after every optimizer step, `step` counting completed steps from 1
  (a router's bias update, a weight average). Under DDP/FSDP every process calls it.
- `frozen={"reference": ref_model}`: models the loss reads (as a third argument) but nothing trains.
- `TrainConfig.loss_chunk`: a loss that takes a `chunk_size` keyword is called with it.
- A loss that returns a SUM over tokens and their count as "num_tokens" (`NUM_TOKENS`) has the
  step's gradient divided by the supervised tokens of the whole step; a mean is averaged over
  micro-batches. training/loss_protocol.py details these three.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from architectures.utils.command_line import Interrupted
from architectures.utils.device import compute_dtype, resolve_device
from training import checkpointing
from training.batches import batch_generator, move_batch, pin_batch, slice_batch, target_tokens
from training.distributed import Distributed
from training.interrupt import StopRequest
from training.loss_protocol import NUM_TOKENS, call_loss, prepare_frozen, with_loss_chunk
from training.metrics import MetricsLog, Window, memory_gb, peak_flops
from training.optimizer import lr_schedule, make_optimizer as default_optimizer
from training.profiling import start_profiler
from training.train_config import RESUMABLE_CHANGES, TrainConfig, validate


@dataclass
class TrainResult:
    step: int  # optimizer steps completed
    train_loss: float  # last logged training loss
    val_loss: float | None  # last validation loss
    elapsed_s: float  # wall time of the training steps (evaluation and compile warm-up included)
    metrics_path: Path | None


@dataclass
class Run:
    """What the parts of a step share: what `train` set up, and where the run stands."""
    cfg: TrainConfig
    dd: Distributed
    device: torch.device
    autocast_dtype: torch.dtype | None  # None: fp32, no autocast
    model: nn.Module  # the parameters, their gradients, train or eval mode
    wrapped: nn.Module  # what the forward runs through: DDP's wrapper, or the model (FSDP2 shards it in place)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    loss_fn: Callable  # the loss as evaluation calls it
    step_loss: Callable  # the loss as training calls it: compiled under cfg.compile
    sample_batch: Callable[[str, int, torch.Generator], Any]
    frozen: Mapping[str, nn.Module] | None
    out: Path | None
    metrics: MetricsLog
    window: Window
    last_checkpoint: int | None  # the step of this run's newest checkpoint, which the NaN error names
    train_loss: float  # the last logged training loss
    train_loss_step: int | None  # and its step (None before the first log line)
    val_loss: float | None = None
    t0: float = field(default_factory=time.perf_counter)
    eval_s: float = 0.0  # time in evaluation
    warmup_s: float = 0.0  # time of the first step, which compiles under cfg.compile


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
    frozen, wrapped, optimizer, scheduler = place_model(model, cfg, dd, device, frozen,
                                                        make_optimizer or default_optimizer)
    out = Path(out_dir) if out_dir is not None else None
    record = {"train": vars(cfg).copy(), **(config_record or {})}
    start_step, history, saved_window = checkpointing.start_or_resume(
        out, resume, model, optimizer, scheduler, record, RESUMABLE_CHANGES, dd)
    loss_fn = with_loss_chunk(loss_fn, cfg.loss_chunk)
    # Compiling the loss function compiles the model inside it too, and lets the compiler fuse
    # the output head, the fp32 upcast and the cross-entropy instead of materialising fp32 logits.
    step_loss = torch.compile(loss_fn) if cfg.compile else loss_fn
    profiler = start_profiler(out, device) if cfg.profile and dd.is_main else None
    last_train = next((e for e in reversed(history) if "loss" in e), {"loss": float("nan"), "step": None})
    run = Run(cfg, dd, device, autocast_dtype, model, wrapped, optimizer, scheduler, loss_fn, step_loss, sample_batch,
              frozen, out, MetricsLog(history, out, on_log, dd.is_main, cfg.max_steps, start_step, loss_label),
              Window.restored(saved_window, device), last_checkpoint=start_step if resume else None,
              train_loss=last_train["loss"], train_loss_step=last_train["step"])

    model.train()
    with StopRequest(enabled=not dd.enabled) as stop:
        for step in range(start_step, cfg.max_steps):
            micro_batches = next_batch(run, step)
            summed = []  # (loss, supervised tokens) of each micro-batch, when the loss sums over its tokens
            for index, micro_batch in enumerate(micro_batches):
                micro_step(run, micro_batch, step, index, summed)
            grad_norm = optimizer_step(run, step, summed)
            done = step + 1
            if on_step is not None:
                on_step(done, model)
            if profiler is not None:
                profiler.step()
            count_step(run, first=step == start_step)

            if done % cfg.log_interval == 0 or done == cfg.max_steps:
                log_training(run, done, grad_norm, flops_per_token)
            if done % cfg.eval_interval == 0 or done == cfg.max_steps:
                log_validation(run, done, val_units_per_token)
            if out is not None and save_model is not None and (
                    (cfg.checkpoint_interval and done % cfg.checkpoint_interval == 0) or done == cfg.max_steps):
                save_checkpoint(run, done, record, save_model)
            elif stop.requested:
                stop_early(run, done, record, save_model)
            if stop.requested and done < cfg.max_steps:
                run.metrics.close()
                raise Interrupted(f"Ctrl-C after step {done} of {cfg.max_steps}; " + (
                    f"the checkpoint in {out} resumes exactly: run the same command with --resume"
                    if run.last_checkpoint == done else "this run writes no checkpoint, so nothing was saved"))
    run.metrics.close()
    if profiler is not None:
        profiler.stop()
    elapsed = time.perf_counter() - run.t0
    dd.close()
    return TrainResult(cfg.max_steps, run.train_loss, run.val_loss, elapsed, out / "metrics.jsonl" if out else None)


def place_model(model: nn.Module, cfg: TrainConfig, dd: Distributed, device: torch.device,
                frozen: Mapping[str, nn.Module] | None, make_optimizer: Callable):
    """(frozen models, wrapped model, optimizer, schedule): `model` seeded, on the device and under
    the parallel strategy, with its frozen models, its optimizer and the warm-up + cosine schedule."""
    if cfg.activation_checkpointing:
        if not hasattr(model, "gradient_checkpointing"):
            raise ValueError(f"{type(model).__name__} does not support activation checkpointing")
        model.gradient_checkpointing = True
    torch.manual_seed(cfg.seed)
    model.to(device)
    frozen = prepare_frozen(frozen, model, device, dd) if frozen else None
    wrapped = dd.wrap(model)  # DDP wrapper, or `model` itself sharded in place by FSDP2
    # The optimizer is built after sharding: under FSDP2 it must hold (and update) the local shards.
    optimizer = make_optimizer(model, cfg, device)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"make_optimizer must return a torch.optim.Optimizer, got {type(optimizer).__name__}")
    scheduler = lr_schedule(optimizer, cfg)
    return frozen, wrapped, optimizer, scheduler


def next_batch(run: Run, step: int) -> list:
    """This process's micro-batches of the step's global batch, their copies to the device enqueued."""
    cfg, dd = run.cfg, run.dd
    per_rank = cfg.batch_size // dd.world_size
    micro = per_rank // cfg.grad_accum_steps
    # Sampling and the (pinned, non-blocking) copy run on the host while the GPU still works
    # through the previous step's queued kernels: the batch is prefetched without a thread.
    t_data = time.perf_counter()
    batch = run.sample_batch("train", cfg.batch_size, batch_generator(cfg.seed, "train", step))
    rows = slice_batch(batch, dd.rank * per_rank, (dd.rank + 1) * per_rank)
    pinned = [pin_batch(slice_batch(rows, i * micro, (i + 1) * micro), run.device) for i in range(cfg.grad_accum_steps)]
    # data_s is the host's own work on the batch. The copies are enqueued outside it: when the
    # host runs ahead of the GPU, enqueueing waits for room in the queue, which is GPU time.
    run.window.data_s += time.perf_counter() - t_data
    return [move_batch(mb, run.device) for mb in pinned]


def micro_step(run: Run, batch: Any, step: int, index: int, summed: list) -> None:
    """Forward and backward of micro-batch `index` of the step. A mean loss is divided by the number
    of micro-batches (the accumulated gradient is then the mean's over the step's rows) and added to
    the log window; a summed loss (it reports num_tokens) goes to `summed`, for `optimizer_step`."""
    cfg, window = run.cfg, run.window
    last = index == cfg.grad_accum_steps - 1
    # DDP and FSDP2 synchronise gradients on the last micro-step only. The backward must run
    # inside no_sync too: FSDP2 decides in its backward hooks.
    with contextlib.nullcontext() if last else run.dd.no_sync(run.wrapped):
        with torch.autocast(run.device.type, dtype=run.autocast_dtype, enabled=run.autocast_dtype is not None):
            loss, extras, count = call_loss(run.step_loss, run.wrapped, batch, run.frozen)
        if index > 0 and (count is not None) != bool(summed):
            raise ValueError(f"the loss function reported '{NUM_TOKENS}' for some micro-batches of step "
                             f"{step + 1} and not for others; report it always (then the loss is a sum) or never")
        if count is None:
            (loss / cfg.grad_accum_steps).backward()
            window.loss_sum += loss.detach() / cfg.grad_accum_steps
            window.tokens += target_tokens(batch) * run.dd.world_size
        else:
            loss.backward()  # a sum: divided in optimizer_step by the whole step's token count
            summed.append((loss.detach().float(), count))
    for k, v in extras.items():
        window.extra_sums[k] = window.extra_sums.get(k, 0) + v.detach().float() / cfg.grad_accum_steps


def optimizer_step(run: Run, step: int, summed: list) -> torch.Tensor:
    """Clip the step's gradient and apply it; the schedule then sets the next step's learning rate.
    A summed loss's gradient is first divided by the step's tokens. Returns the norm before clipping."""
    cfg, dd, window = run.cfg, run.dd, run.window
    if summed:
        token_sum = torch.zeros((), device=run.device)
        for loss, _ in summed:
            token_sum += loss
        # DDP and FSDP2 average gradients over processes; times world_size / (tokens of the
        # whole step, every process) turns that average of sums into the mean over tokens.
        step_tokens = dd.mean(torch.stack([count for _, count in summed]).sum()) * dd.world_size
        scale = dd.world_size / step_tokens.clamp_min(1)
        for p in run.model.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)
        window.loss_sum += token_sum * scale  # the processes' shares add up (dd.mean at log time) to the token mean
        window.tokens = window.tokens + step_tokens
    window.bad_step = torch.where((window.bad_step < 0) & ~torch.isfinite(window.loss_sum), step, window.bad_step)
    grad_norm = nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return grad_norm


def count_step(run: Run, first: bool) -> None:
    """One more step on the progress bar and in the log window; the first one's time is the warm-up."""
    run.metrics.advance()
    if first:
        if run.device.type == "cuda":
            torch.cuda.synchronize(run.device)  # once: so that the first step's time is its real time
        run.warmup_s = time.perf_counter() - run.t0
    run.window.steps += 1


def log_training(run: Run, done: int, grad_norm: torch.Tensor, flops_per_token: float | None) -> None:
    """The metrics line of the log window, which then starts anew; `done` steps are complete."""
    dd, window = run.dd, run.window
    # The only host-device synchronisation of the step: read what accumulated since the last log.
    n = window.steps
    loss_avg = dd.mean(window.loss_sum / n)
    check_finite(run)
    dt = time.perf_counter() - window.t_start
    run.train_loss, run.train_loss_step = float(loss_avg), done
    tokens = float(window.tokens)
    entry = {"step": done, "lr": run.scheduler.get_last_lr()[0], "loss": run.train_loss,
             "grad_norm": float(dd.mean(grad_norm) if hasattr(grad_norm, "full_tensor") else grad_norm),
             "tokens": tokens, "tokens_per_s": tokens / dt, "data_fraction": window.data_s / dt}
    entry.update(memory_gb(run.device))
    peak = peak_flops(run.device)
    if flops_per_token and peak:
        entry["mfu"] = tokens * flops_per_token / dt / (peak * dd.world_size)
    entry.update({k: float(dd.mean(v / n)) for k, v in window.extra_sums.items()})
    run.metrics.log(entry)
    run.metrics.show_loss(run.train_loss)
    run.window = window.next()


def log_validation(run: Run, done: int, val_units_per_token: float | None) -> None:
    """Evaluate, log the validation loss and say it with the latest training loss."""
    t_eval = time.perf_counter()
    run.val_loss = evaluate(run)
    run.eval_s += time.perf_counter() - t_eval
    now = time.perf_counter() - run.t0
    # train_s: time in training steps alone, without evaluation and without the first
    # step (compilation), the figure "time to reach a validation loss" is measured in.
    entry = {"step": done, "val_loss": run.val_loss, "elapsed_s": now, "train_s": now - run.eval_s - run.warmup_s}
    if val_units_per_token:
        entry["val_nats_per_char"] = run.val_loss * val_units_per_token
    run.metrics.log(entry)
    extra = f", {entry['val_nats_per_char']:.4f} nats/char" if "val_nats_per_char" in entry else ""
    # The training loss is read every log_interval steps: say which step it is from when
    # that is not this one, and leave it out before the first.
    label = run.metrics.loss_label
    trained = "" if run.train_loss_step is None else f"{label} {run.train_loss:.4f}" + (
        f" (at step {run.train_loss_step})" if run.train_loss_step != done else "") + ", "
    run.metrics.say(f"step {done}/{run.cfg.max_steps}: {trained}val loss {run.val_loss:.4f}{extra}")
    run.window.t_start = time.perf_counter()  # evaluation time is not training throughput


def stop_early(run: Run, done: int, record: dict, save_model: Callable | None) -> None:
    """After a Ctrl-C: the checkpoint of step `done`, where the run has somewhere to write one."""
    if run.out is not None and save_model is not None:
        save_checkpoint(run, done, record, save_model)


def save_checkpoint(run: Run, done: int, record: dict, save_model: Callable) -> None:
    """A checkpoint of step `done` (with the log window) in the output directory, and the loss curve."""
    check_finite(run)  # a checkpoint never holds parameters a non-finite loss has updated
    checkpointing.save(run.out, run.model, run.optimizer, run.scheduler, done, record, save_model, run.dd,
                       loop_state=run.window.saved(run.dd))
    run.last_checkpoint = done
    run.metrics.plot(run.out / "loss.png")


def check_finite(run: Run) -> None:
    """Stop, naming the step, if a loss so far was NaN or inf."""
    bad_step = int(run.window.bad_step)
    if bad_step >= 0:
        saved = (f"the last checkpoint, of step {run.last_checkpoint}, in {run.out}, holds the parameters from before it"
                 if run.last_checkpoint is not None else "no checkpoint was saved yet")
        raise FloatingPointError(f"loss became NaN or inf at step {bad_step + 1}; lower --lr, enable --grad-clip, "
                                 f"or check the data ({saved})")


@torch.no_grad()
def evaluate(run: Run) -> float:
    """Mean loss over cfg.eval_batches validation batches, the same batches at every evaluation
    (per supervised token when the loss reports "num_tokens", else per batch)."""
    cfg, dd, device, model = run.cfg, run.dd, run.device, run.model
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), device=device), torch.zeros((), device=device)
    micro = cfg.batch_size // (dd.world_size * cfg.grad_accum_steps)
    for i in range(cfg.eval_batches):
        batch = run.sample_batch("val", micro, batch_generator(cfg.seed, "val", i))
        with torch.autocast(device.type, dtype=run.autocast_dtype, enabled=run.autocast_dtype is not None):
            loss, _, tokens = call_loss(run.loss_fn, model, move_batch(pin_batch(batch, device), device), run.frozen)
        total += loss.float()
        count += 1 if tokens is None else tokens
    model.train(was_training)
    return float(total / count.clamp_min(1))
