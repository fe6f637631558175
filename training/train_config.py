"""The loop's settings, `TrainConfig`, and the checks a run makes of them before any work starts.

Every field is also a command-line option of every train script (training/cli.py turns the comment
on its line into the option's --help), so a check here is what a user's mistake meets first.
"""

from __future__ import annotations

from dataclasses import dataclass

from training.checks import check_in
from training.distributed import STRATEGIES


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
    for name, interval, why in (("lr", "(0, inf)", "the peak learning rate"), ("min_lr", "[0, inf)", ""),
                                ("weight_decay", "[0, inf)", ""), ("grad_clip", "[0, inf)", "0: no clipping"),
                                ("beta1", "[0, 1)", "AdamW's moment decay"), ("beta2", "[0, 1)", "AdamW's moment decay")):
        check_in("--" + name.replace("_", "-"), float(getattr(cfg, name)), interval, why)
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


def config_notes(cfg: TrainConfig, world_size: int, typed: set[str]) -> list[str]:
    """Settings the user typed (`typed`: field names) that are valid but probably not what they meant,
    each said once as a `note:` (a preset's warm-up cut short by a quick --max-steps is no surprise)."""
    notes = []
    if cfg.warmup_steps > cfg.max_steps and "warmup_steps" in typed:
        peak = cfg.lr * cfg.max_steps / cfg.warmup_steps
        notes.append(f"the warm-up ({cfg.warmup_steps} steps) is longer than the run ({cfg.max_steps} steps): the "
                     f"learning rate only reaches {peak:.3g}, not --lr {cfg.lr:g}; lower --warmup-steps to train at --lr")
    if cfg.parallel == "fsdp" and world_size == 1 and "parallel" in typed:
        notes.append("--parallel fsdp shards the model over the processes torchrun starts; this run is one process, "
                     "so it trains unsharded (start it with torchrun --nproc-per-node N to shard)")
    return notes
