"""The post-training toolkit: what SFT, LoRA, DPO, GRPO and distillation share around the loop.

Each method's train.py starts from a checkpoint, trains it with the shared loop
(training/trainer.py) on its own batches and loss, and ends with a summary. The pieces they have
in common live here, so that no method imports another method's script:

  pretrained_dir        the checkpoint a method starts from: the one given, or the quick start's,
                        trained now if it is missing
  Reference             the model a preference or RL method keeps its policy near: a frozen copy
                        of the starting model, or the policy itself with its LoRA adapters off
  policy_and_reference  makes the policy (adapters applied with --lora) and its `Reference`
  no_dropout            dropout off, for a method whose policy ratio compares two passes
  with_aux_loss         the method's loss plus the base family's auxiliary terms (a mixture of
                        experts' load-balancing losses), taken from the policy's own forward pass
  family_on_step        the loop's `on_step`: the family's hook (a router's bias update), then
                        the method's own
  method_saver          the loop's `save_model`: the whole model, or the LoRA adapter in PEFT's
                        format, with the tokenizer beside it
  write_summary         summary.json and the run's last line
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from architectures import registry
from architectures.common.checkpoint import read_config_json
from architectures.utils.device import device_label
from architectures.utils.files import atomic_write_json
from architectures.utils.wrappers import unwrap
from training import checkpointing
from training.cli import checkpoint_saver, run, say
from training.data import DATA_DIR_ENV, FALLBACK_NAME, TINYSHAKESPEARE_FILE, NoTinyShakespeare, get_corpus
from training.lora import ALL_PROJECTIONS, LoRAConfig, apply_lora, disable_adapters, save_adapter
from training.recipes import pretraining_recipes
from training.tokenizer import Tokenizer
from training.loss_protocol import NUM_TOKENS


def pretrained_dir(given: str, flag: str, preset: str, why_tokenizer: str) -> Path:
    """The checkpoint a method starts from: `given` (checked to hold config.json and tokenizer.json),
    or, when empty, the quick start's (the registry's QUICK_START_FAMILY) for this preset, trained
    now if it is missing; a preset the quick start does not have uses its `tiny`. The default is
    never a model of the offline stand-in corpus: where Tiny Shakespeare cannot be found, the
    quick start is not trained, and a folder trained on the stand-in is refused."""
    if given:
        path = Path(given)
        if not (path / "config.json").is_file():
            if (path / "model_index.json").is_file():
                read_config_json(path)  # a diffusion pipeline: refused as such, in one line
            raise FileNotFoundError(f"{flag} {path} has no config.json; pass a zoo or Hugging Face checkpoint directory")
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{flag} {path} has no tokenizer.json; {why_tokenizer}")
        return path
    family = registry.QUICK_START_FAMILY
    quick_preset = preset if preset in pretraining_recipes(family) else "tiny"
    path = Path(f"runs/{family}-{quick_preset}")
    command = f"python -m architectures.{family}.train --preset {quick_preset} --out {path}"
    fix = (f"train the quick start where Tiny Shakespeare can be found (online, or with ${DATA_DIR_ENV} set to the "
           f"folder that holds {TINYSHAKESPEARE_FILE}): {command}; or pass {flag} DIR")
    if (path / "config.json").is_file():
        if trained_on(path) == FALLBACK_NAME:
            raise ValueError(f"{flag}: the default, {path}, was trained on the offline stand-in corpus, not Tiny "
                             f"Shakespeare, so it is not taken as a base; move it away and {fix}")
        return path
    try:
        get_corpus("tinyshakespeare", fallback=False)
    except NoTinyShakespeare as e:
        raise NoTinyShakespeare(f"{flag}: the default, {path}, does not exist yet, and the quick start that makes it "
                                f"needs Tiny Shakespeare: {e}; {fix}") from None
    say(f"{flag.lstrip('-')}: {path} does not exist yet, so the quick start trains it first ({command})")
    run(family, argv=["--preset", quick_preset, "--out", str(path)])
    return path


def trained_on(path: Path) -> str | None:
    """The corpus a zoo checkpoint was pretrained on, from its summary.json or its training record."""
    summary = path / "summary.json"
    if summary.is_file():
        with contextlib.suppress(ValueError, AttributeError):
            corpus = json.loads(summary.read_text()).get("corpus")
            if corpus:
                return corpus
    with contextlib.suppress(FileNotFoundError, NotADirectoryError, KeyError, TypeError):
        return checkpointing.read_record(path)["corpus"]["name"]
    return None


# ---------------------------------------------------------------------------- the reference


class Reference:
    """The model a method keeps its policy near (DPO's pi_ref, GRPO's KL anchor).

    Either a frozen copy of the starting model (`copy`), or, when the policy trains LoRA adapters
    (`copy` None), the policy itself with its adapters switched off (`disable_adapters`): the
    base weights are shared, so the reference costs no second copy. The copy goes to the loop as
    `frozen={"reference": copy}` (`frozen`), which moves it to the device and casts it to the
    policy's dtype; a loss sees it again as its third argument, and `Reference.from_frozen` turns
    that argument back into the reference it names."""

    def __init__(self, copy: nn.Module | None):
        self.copy = copy

    @classmethod
    def from_frozen(cls, frozen) -> Reference:
        """The reference of a loss called by the loop: the prepared copy, or none (LoRA)."""
        return cls(frozen["reference"] if frozen else None)

    @property
    def frozen(self) -> dict | None:
        """The loop's `frozen` argument: the copy, or None when the reference is the policy itself."""
        return {"reference": self.copy} if self.copy is not None else None

    def to(self, device) -> Reference:
        if self.copy is not None:
            self.copy.to(device)
        return self

    @contextlib.contextmanager
    def model(self, policy: nn.Module):
        """The reference as a module to call, given the policy as the caller has it (wrapped or not)."""
        if self.copy is not None:
            yield self.copy
            return
        with disable_adapters(unwrap(policy)):
            yield policy

    @torch.no_grad()
    def logits(self, policy: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        """The reference's logits (B, T, V) for ids (B, T), without gradients."""
        with self.model(policy) as model:
            return model(ids)


def policy_and_reference(model: nn.Module, lora: bool, r: int) -> Reference:
    """For a method that keeps the policy near where it started (DPO, GRPO): with `lora`, adapters
    of rank r (alpha 2r) on every projection of `model`, in place, and the policy with them off as
    the reference; otherwise a frozen copy of `model`, taken before anything trains."""
    if lora:
        apply_lora(model, LoRAConfig(r=r, alpha=2 * r, target_modules=ALL_PROJECTIONS))
        return Reference(None)
    return Reference(copy.deepcopy(model).eval().requires_grad_(False))


def no_dropout(model: nn.Module) -> None:
    """For an RL method, whose ratio pi / pi_old compares two passes over the same tokens: dropout
    would make it noise. Sets every dropout probability of `model` to 0, in place."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "dropout", None), float):
            m.dropout = 0.0


# ---------------------------------------------------------------------------- a mixture of experts as the base


class AuxiliaryLoss:
    """A method's loss plus the auxiliary terms of its base's family (`Family.aux_loss`: Mixtral's
    load-balancing and router z-loss, DeepSeek-V3's sequence-wise balance loss), their metrics
    (aux_loss, z_loss, the experts' loads) logged beside the method's own.

    The terms belong to the policy's forward pass, so a forward hook on the model reads them as
    that pass ends, from a pass that builds a graph only. Passes under no_grad add nothing: a
    reference that runs afterwards on the same modules (LoRA's adapter-disabled policy, whose
    routers would overwrite what the policy's left), a rollout, the loop's evaluation (whose
    validation loss stays the method's own). A loss returned as a sum over metrics["num_tokens"]
    tokens (SFT, distillation) takes the terms once per token: the loop divides that sum by the
    step's tokens, which brings them back to their own scale. The hook stays on the model and
    does nothing outside a call of this loss."""

    def __init__(self, loss_fn: Callable, model: nn.Module, aux_loss: Callable):
        self.loss_fn, self.aux_loss = loss_fn, aux_loss
        self.found: list | None = None  # (terms or None, metrics) of each pass, while the loss runs
        unwrap(model).register_forward_hook(self.after_forward)
        # The loop reads the loss's name and signature (whether it takes chunk_size) through the wrapper.
        functools.update_wrapper(self, loss_fn)

    def after_forward(self, module: nn.Module, inputs, output) -> None:
        if self.found is not None and torch.is_grad_enabled():
            self.found.append(self.aux_loss(module))

    def __call__(self, model, batch, *args, **kwargs):
        self.found = []
        try:
            loss, metrics = self.loss_fn(model, batch, *args, **kwargs)
        finally:
            found, self.found = self.found, None
        metrics = dict(metrics)
        terms = [t for t, _ in found if t is not None]
        for _, extra in found:
            metrics.update(extra)
        if terms:
            aux = torch.stack(terms).sum()
            loss = loss + (aux * metrics[NUM_TOKENS] if NUM_TOKENS in metrics else aux)
        return loss, metrics


def with_aux_loss(loss_fn: Callable, model: nn.Module) -> Callable:
    """`loss_fn` with the family's auxiliary terms added (`AuxiliaryLoss`), or `loss_fn` itself for a
    family without them (Llama 3, the Mamba-2 hybrid)."""
    aux_loss = registry.family(registry.family_of(unwrap(model))).aux_loss
    return loss_fn if aux_loss is None else AuxiliaryLoss(loss_fn, model, aux_loss)


def family_on_step(model: nn.Module, *hooks: Callable) -> Callable | None:
    """The loop's `on_step`: the family's hook first (DeepSeek-V3's and Nemotron-H's router-bias
    update), then each of the method's `hooks`; None when there is none."""
    chain = [h for h in (registry.family(registry.family_of(unwrap(model))).on_step, *hooks) if h is not None]
    if len(chain) <= 1:
        return chain[0] if chain else None

    def on_step(step: int, model: nn.Module) -> None:
        for hook in chain:
            hook(step, model)
    return on_step


# ---------------------------------------------------------------------------- saving and the summary


def adapter_saver(tokenizer: Tokenizer, base: str) -> Callable:
    """The loop's `save_model`: the adapter in PEFT's format, and the tokenizer beside it."""
    def save_model(model, directory, state_dict=None) -> None:
        save_adapter(model, directory, base_model_name_or_path=base)
        tokenizer.save(directory / "tokenizer.json")
    return save_model


def method_saver(model: nn.Module, tokenizer: Tokenizer, base: Path, lora: bool) -> Callable:
    """The loop's `save_model`: the adapter in PEFT's format with `lora`, else the whole model in its
    family's format; the tokenizer beside either."""
    if lora:
        return adapter_saver(tokenizer, str(base))
    return checkpoint_saver(registry.family(registry.family_of(model)).save_pretrained, tokenizer)


def write_summary(out: Path, summary: dict, t_start: float, device, written: str) -> dict:
    """summary.json with the total time and the device, and the run's last line."""
    summary = {**summary, "total_s": time.perf_counter() - t_start, "device": device_label(device)}
    atomic_write_json(out / "summary.json", summary)
    say(f"---- {written} in {out}; {summary['total_s']:.0f} s in all ({summary['device']}) ----")
    return summary
