"""What the two experiments of this folder share: equal_time.py (Tiny Shakespeare at equal
training time) and mqar.py (associative recall). Both compare attention, Mamba-2 and a hybrid
of (nearly) one parameter count, so both build a model from either family's config, count and
compare parameters, time the models' steps taking turns, fit a run's schedule to its step count,
and share their command-line options and figure handling.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from architectures.llama3 import Llama3, LlamaConfig
from architectures.mamba2_hybrid.model import Mamba2Hybrid
from architectures.utils.command_line import ArgumentParser
from architectures.utils.device import add_device_option
from architectures.utils.timing import interleaved_step_times as step_times_in_turns
from training.train_config import TrainConfig

PARAMETER_TOLERANCE = 0.03  # the three models' parameter counts differ by at most 3% of the largest


def build_model(cfg) -> nn.Module:
    """Llama 3 for a `LlamaConfig`, the Mamba-2 / Nemotron-H stack for a `Mamba2HybridConfig`."""
    return Llama3(cfg) if isinstance(cfg, LlamaConfig) else Mamba2Hybrid(cfg)


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Total parameters, and those outside the embedding (the head included, as `num_parameters` counts)."""
    return {"parameters": model.num_parameters(), "non_embedding": model.num_parameters(non_embedding=True)}


def parameter_spread(counts: dict[str, int]) -> float:
    """(largest - smallest) / largest of a {kind: parameters} map: 0.03 is "within 3%"."""
    return (max(counts.values()) - min(counts.values())) / max(counts.values())


def describe(cfg) -> str:
    """One line of what a config builds, for the logs and results.json."""
    if isinstance(cfg, LlamaConfig):
        return (f"Llama 3: {cfg.num_hidden_layers} x (attention {cfg.num_attention_heads}/{cfg.num_key_value_heads} "
                f"heads of {cfg.head_dim}, RoPE + SwiGLU {cfg.intermediate_size}), D {cfg.hidden_size}")
    p = cfg.hybrid_override_pattern
    attention = (f", attention {cfg.num_attention_heads}/{cfg.num_key_value_heads} heads of {cfg.head_dim} "
                 f"(no RoPE)" if "*" in p else "")
    mlp = f", MLP {cfg.intermediate_size}" if "-" in p else ""
    return (f"pattern {p}: Mamba-2 H {cfg.mamba_num_heads} x P {cfg.mamba_head_dim}, state N "
            f"{cfg.ssm_state_size}, G {cfg.n_groups}{attention}{mlp}, D {cfg.hidden_size}")


def interleaved_step_times(models: dict[str, nn.Module], loss_fn: Callable, batch, device: torch.device,
                           dtype: torch.dtype, rounds: int = 5) -> dict[str, float]:
    """Median seconds of one training step of each model, the models taking turns on one batch
    (`architectures.utils.timing.interleaved_step_times`). The models train a few steps, so pass copies."""
    autocast = dtype if dtype != torch.float32 else None
    return step_times_in_turns({name: (m, loss_fn) for name, m in models.items()}, batch, device, autocast, rounds)


def with_steps(cfg: TrainConfig, steps: int, evals: int) -> TrainConfig:
    """cfg for a run of `steps` optimizer steps with the schedule's shape kept: warm-up over the first
    10%, cosine decay to min_lr at the last step, and `evals` evaluations spread over the run."""
    if steps < 1:
        raise ValueError(f"a run needs at least one step, got {steps}; raise the time budget or --max-steps")
    return dataclasses.replace(cfg, max_steps=steps, warmup_steps=max(1, steps // 10),
                               eval_interval=max(1, steps // evals), log_interval=max(1, min(cfg.log_interval, steps)))


def save_figure(figure: Path, copy_to: str | None) -> None:
    """Also copy the figure to `copy_to` (the --figure option), when it is given."""
    if copy_to:
        Path(copy_to).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(figure, copy_to)


def experiment_parser(prog: str, out: str, sizes: dict, figure: str) -> ArgumentParser:
    """The options equal_time.py and mqar.py share; each adds its own after these."""
    p = ArgumentParser(prog=prog)
    p.add_argument("--out", default=out, help="folder for the runs, results.json and the figure")
    p.add_argument("--size", choices=sorted(sizes), default="cpu", help="cpu: a 2-core CPU in minutes; gpu: one GPU (the sizes the note reports)")
    add_device_option(p, default=None, help="default: cpu for --size cpu, auto (cuda if present) for gpu")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per step (default: the size's)")
    p.add_argument("--figure", default=None, help=f"also copy the figure here, e.g. {figure}")
    p.add_argument("--plot-only", action="store_true", help="redraw the figure from --out's results.json; train nothing")
    return p


def redraw(args, plot_fn: Callable[[dict, Path], Path]) -> dict:
    """--plot-only: the figure again from OUT/results.json, nothing trained."""
    results = json.loads((Path(args.out) / "results.json").read_text())
    save_figure(plot_fn(results, Path(args.out)), args.figure)
    return results


def size_train_config(train_cfg: TrainConfig, args, names: tuple[str, ...]) -> TrainConfig:
    """The size's training settings with the options in `names` that were given on the command line."""
    return dataclasses.replace(train_cfg, **{k: getattr(args, k) for k in names if getattr(args, k)})
