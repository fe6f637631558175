"""Distil a trained teacher into a smaller student, beside the same student trained from scratch.

    python -m training.distillation.train --preset tiny                  # 2-core CPU, about 3 minutes (teacher excluded)
    python -m training.distillation.train --preset tiny --teacher DIR --student-family mixtral
    python -m training.distillation.train --preset tiny --kind jsd --beta 0.5 --on-policy 0.5
    python -m training.distillation.train --preset shakespeare           # one GPU

The teacher is any zoo or Hugging Face-format checkpoint directory with its tokenizer.json
(default for `tiny`: the quick start's, runs/llama3-tiny, trained first if it is missing). The
student is a new model of any registered family, by default a Llama 3 a fifth of the teacher's
size, or a checkpoint (`--student DIR`); it must share the teacher's tokenizer. Both read Tiny
Shakespeare (or --dataset) tokenized with the teacher's tokenizer, and the student trains with the
shared loop on `distillation_loss` against the frozen teacher (`frozen={"teacher": teacher}`),
optionally mixed with the data's cross-entropy (`--alpha`). With `--on-policy L`, a fraction L of
the training batches are the student's own continuations of the data's first `--prompt-tokens`
tokens, scored by the teacher (GKD's lambda, Agarwal et al. 2023, arXiv:2306.13649).

With `--baseline` (on in both presets) the same student, from the same initial weights, then
trains on the same token windows for the same steps with its family's own pretraining loss, into
OUT/baseline. Both runs' validation cross-entropy is measured at the loop's evaluation steps on
the loop's validation batches (OUT/student_val.jsonl, OUT/baseline/student_val.jsonl) and plotted
against the teacher's in OUT/distillation.png (training/distillation/curves.py); the end prints the
whole validation split's nats per character of teacher, distilled student and baseline
(notes/distillation.md). A mixture-of-experts student keeps its family's auxiliary losses and
router-bias update in both runs (training/posttrain.py).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from architectures import registry
from architectures.common.loss import IGNORE_INDEX
from architectures.utils.command_line import command_line
from architectures.utils.config import apply_overrides
from architectures.utils.device import resolve_device
from architectures.utils.files import atomic_write_json
from architectures.utils.wrappers import unwrap
from inference.sampling import SamplingParams, generate
from training import checkpointing
from training.checks import check_in
from training.cli import (Args, RunData, build_model, checkpoint_saver, final_report, is_main_process, load_data,
                          parse, rederive, say)
from training.distillation.curves import ValidationCurve, plot_runs
from training.distillation.loss import KINDS, distillation_loss
from training.lm import evaluate_split
from training.posttrain import family_on_step, pretrained_dir, with_aux_loss
from training.recipes import Recipe
from training.tokenizer import Tokenizer, fingerprint
from training.loss_protocol import NUM_TOKENS
from training.train_config import TrainConfig
from training.trainer import train


@dataclass
class DistillConfig:
    GROUP = "method"  # the title of these options in --help

    teacher: str = ""  # teacher checkpoint directory with its tokenizer.json ("": the quick start's for this preset, trained first if missing)
    student: str = ""  # student checkpoint directory to start from ("": a new model of --student-family/--student-preset/--student-config)
    student_family: str = "llama3"  # registry family of a new student
    student_preset: str = "tiny"  # the family's preset a new student starts from
    student_config: str = ""  # overrides of that preset's fields, "name=value,name=value" (vocab_size comes from the teacher's tokenizer)
    kind: str = "forward_kl"  # the divergence: "forward_kl" KL(teacher||student), "reverse_kl" KL(student||teacher), or "jsd"
    beta: float = 0.5  # jsd's mixture weight: 0 is forward KL, 1 reverse KL
    temperature: float = 1.0  # both distributions are softmax(logits / temperature); > 1 softens them
    alpha: float = 0.0  # weight of the data's cross-entropy: loss = (1 - alpha) * divergence + alpha * cross-entropy
    on_policy: float = 0.0  # GKD's lambda: the fraction of training batches the student writes itself (scored by the teacher)
    prompt_tokens: int = 32  # on-policy: the data tokens each row keeps as its prompt; the student samples the rest of the row
    sample_temperature: float = 1.0  # on-policy: the student's sampling temperature
    baseline: bool = True  # also train the same student from scratch on the same tokens and steps, into OUT/baseline


@dataclass
class DistillDataConfig:
    dataset: str = "tinyshakespeare"  # "tinyshakespeare", a local .txt/.jsonl file, or a hub dataset name (tokenized with the teacher's tokenizer)
    sample_prompt: str = "\n"  # text the end-of-run sample continues


RECIPES = {
    # The quick start's teacher (Llama 3 4 x 128, 0.92M parameters) into a Llama 3 of 2 x 64 (0.16M),
    # with the teacher's batch and block size; fewer steps than the teacher's 450.
    "tiny": Recipe(
        model=DistillConfig(student_config="hidden_size=64,intermediate_size=192,num_hidden_layers=2"),
        train=TrainConfig(max_steps=300, batch_size=32, block_size=128, lr=2e-3, min_lr=2e-4, warmup_steps=30,
                          eval_interval=50, eval_batches=10, log_interval=25),
        data=DistillDataConfig(),
    ),
    # The shakespeare-preset teacher (6 x 384, notes/llama3.md) into 4 x 192, on its schedule, with half
    # the loss on the data's own tokens: the teacher overfits its training text, and pure imitation of
    # it ended behind the same student trained from scratch (notes/distillation.md).
    "shakespeare": Recipe(
        model=DistillConfig(student_preset="shakespeare",
                            student_config="hidden_size=192,intermediate_size=512,num_hidden_layers=4", alpha=0.5),
        train=TrainConfig(max_steps=600, batch_size=64, block_size=256, lr=1e-3, min_lr=1e-4, warmup_steps=100,
                          beta2=0.99, eval_interval=100, eval_batches=40, log_interval=50),
        data=DistillDataConfig(),
    ),
}


# ---------------------------------------------------------------------------- checks, teacher, data, student


def check_method(cfg: DistillConfig, train_cfg: TrainConfig) -> None:
    """Everything about the method that can be refused before a teacher is trained or loaded."""
    if cfg.kind not in KINDS:
        raise ValueError(f"--kind {cfg.kind!r} is not one of {', '.join(KINDS)}")
    if not 0.0 <= cfg.beta <= 1.0:
        raise ValueError(f"--beta {cfg.beta} must be in [0, 1] (0: forward KL, 1: reverse KL)")
    if not 0 < cfg.temperature < float("inf"):
        raise ValueError(f"--temperature {cfg.temperature} must be a finite number > 0")
    if not 0.0 <= cfg.alpha <= 1.0:
        raise ValueError(f"--alpha {cfg.alpha} must be in [0, 1] (0: the divergence alone, 1: the data's "
                         f"cross-entropy alone, which is no distillation)")
    if not 0.0 <= cfg.on_policy <= 1.0:
        raise ValueError(f"--on-policy {cfg.on_policy} is a fraction of batches and must be in [0, 1]")
    if cfg.on_policy > 0 and not 1 <= cfg.prompt_tokens < train_cfg.block_size:
        raise ValueError(f"--prompt-tokens {cfg.prompt_tokens} must be in [1, block_size={train_cfg.block_size}): "
                         f"the student continues that many data tokens to a full row")
    check_in("--sample-temperature", cfg.sample_temperature, "[0, inf)", "0: greedy")
    if not cfg.student:
        student_config(cfg)  # a typo in --student-config fails now, not after the teacher is loaded


def student_config(cfg: DistillConfig):
    """The new student's config: the family's preset with --student-config's fields; a field the
    preset derives (head_dim) is derived again from the new sizes. vocab_size is set later."""
    registry.require_lm(cfg.student_family, "--student-family")  # an unknown family is refused here, with the list
    package = registry.package(cfg.student_family)
    base = package.preset(cfg.student_preset)
    overrides = {}
    for item in filter(None, (s.strip() for s in cfg.student_config.split(","))):
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--student-config {cfg.student_config!r}: expected name=value items separated by "
                             f"commas, got {item!r}")
        overrides[name.strip()] = value.strip()
    if "vocab_size" in overrides or "vocab-size" in overrides:
        raise ValueError("--student-config: the student's vocab_size is the teacher's tokenizer's; leave it out")
    where = f"--student-config of {cfg.student_family} preset {cfg.student_preset!r}"
    parsed = apply_overrides(base, overrides, where)  # unknown names and bad types are refused here
    changes = {name.replace("-", "_"): getattr(parsed, name.replace("-", "_")) for name in overrides}
    return dataclasses.replace(base, **rederive(base, changes))


def teacher_dir(args: Args) -> Path:
    """The teacher's checkpoint; for a preset's default, the quick start's, trained now if missing."""
    return pretrained_dir(args.recipe.model.teacher, "--teacher", args.preset,
                          "the student learns the teacher's distributions over the teacher's tokens, so it needs "
                          "the teacher's tokenizer")


def warn_if_other_corpus(teacher_path: Path, data: RunData) -> None:
    """Distilling on text the teacher never saw is allowed, but it is rarely what was meant (a run
    that fell back to the offline corpus, a --dataset typo): say so. A teacher without the zoo's
    training record (a Hugging Face download) is not checked."""
    try:
        trained_on = checkpointing.read_record(teacher_path).get("corpus")
    except (FileNotFoundError, NotADirectoryError):
        return
    if trained_on and trained_on["sha256"] != data.corpus.sha256:
        say(f"note: the teacher was trained on {trained_on['name']!r} (sha256 {trained_on['sha256'][:16]}), and this "
            f"run distils on {data.corpus.name!r} (sha256 {data.corpus.sha256[:16]}); its soft targets describe text "
            f"it has not seen")


def make_student(cfg: DistillConfig, train_cfg: TrainConfig, teacher, teacher_path: Path, tokenizer: Tokenizer):
    """The student, initialised from the run's seed (or loaded), with the teacher's vocabulary."""
    if cfg.student:
        path = Path(cfg.student)
        student = registry.from_pretrained(path)  # refuses a directory without config.json, saying so
        if (path / "tokenizer.json").is_file() and fingerprint(Tokenizer.from_file(path)) != fingerprint(tokenizer):
            raise ValueError(f"--student {path} has another tokenizer than --teacher {teacher_path}; distillation "
                             f"compares the two models' distributions token by token, so they need one tokenizer")
        where = f"--student {path}"
    else:
        family = cfg.student_family
        student = build_model(registry.model_class(family), student_config(cfg), train_cfg, tokenizer)
        where = f"the new {family} student (the tokenizer's {tokenizer.vocab_size} tokens)"
    if student.config.vocab_size != teacher.config.vocab_size:
        raise ValueError(f"the teacher ({teacher_path}) has vocab_size={teacher.config.vocab_size} and {where} has "
                         f"vocab_size={student.config.vocab_size}; distillation compares the two distributions token "
                         f"by token, so both models need the same vocabulary (one tokenizer)")
    for name, model in (("teacher", teacher), ("student", student)):
        if train_cfg.block_size + (cfg.on_policy > 0) > model.config.max_position_embeddings:
            raise ValueError(f"--block-size {train_cfg.block_size}" + (" + 1 (on-policy rows sample one token past "
                             "the block)" if cfg.on_policy > 0 else "") + f" exceeds the {name}'s "
                             f"max_position_embeddings={model.config.max_position_embeddings}; lower --block-size")
    return student.train()


# ---------------------------------------------------------------------------- the batch and the loss


def distillation_batches(data: RunData, cfg: DistillConfig, block_size: int):
    """The loop's `sample_batch`: the data's windows (the very windows the baseline trains on: the
    same generator draws them first), whether this batch is on-policy, and each row's sampling seed,
    all a function of (seed, step), so a resumed run samples what the uninterrupted one did."""
    def sample(split: str, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        x, y = data.tokens.get_batch(split, n, block_size, generator)  # (n, T), (n, T)
        draw = float(torch.rand((), generator=generator)) if split == "train" and cfg.on_policy > 0 else 1.0
        on_policy = draw < cfg.on_policy
        return {"input_ids": x, "labels": y, "on_policy": torch.full((n,), on_policy),
                "sample_seed": torch.randint(2**31 - 1, (n,), generator=generator)}
    return sample


@torch.no_grad()
def student_rollouts(model, batch: dict, cfg: DistillConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, labels, hard_labels) with each on-policy row replaced by the student's own text:
    the row's first prompt_tokens data tokens, then T + 1 - prompt_tokens tokens the student samples
    (`inference.generate`, with a KV cache). Its labels cover the sampled tokens only; it has no
    hard labels (-100), since the data's cross-entropy belongs to the data's text."""
    net = unwrap(model)  # under DDP, generate with the module itself
    was_training = net.training
    net.eval()  # no dropout while the student writes
    x, labels = batch["input_ids"].clone(), batch["labels"].clone()  # (B, T)
    hard = labels.clone()
    p, T = cfg.prompt_tokens, x.shape[1]
    for b in batch["on_policy"].nonzero().flatten().tolist():
        prompt = x[b, :p].tolist()
        params = SamplingParams(temperature=cfg.sample_temperature, max_new_tokens=T + 1 - p,
                                seed=int(batch["sample_seed"][b]))
        row = torch.tensor(prompt + generate(net, prompt, params), device=x.device)  # (T + 1,)
        x[b], labels[b] = row[:-1], row[1:]
        labels[b, :p - 1] = IGNORE_INDEX  # positions that predict prompt tokens
        hard[b] = IGNORE_INDEX
    net.train(was_training)
    return x, labels, hard


def make_loss(cfg: DistillConfig):
    """The loop's loss_fn(model, batch, frozen): the divergence to the teacher, summed over the
    distilled tokens with their count (the loop divides by the step's tokens), plus alpha x the
    data's cross-entropy. Metrics: the mean divergence and the data's cross-entropy per token."""
    def loss_fn(model, batch: dict, frozen) -> tuple[torch.Tensor, dict]:
        x, labels, hard = batch["input_ids"], batch["labels"], batch["labels"]
        if cfg.on_policy > 0 and bool(batch["on_policy"].any()):
            x, labels, hard = student_rollouts(model, batch, cfg)
        with torch.no_grad():
            teacher_logits = frozen["teacher"](x)  # (B, T, V)
        student_logits = model(x)  # (B, T, V)
        divergence = distillation_loss(student_logits, teacher_logits, labels, cfg.kind, cfg.beta, cfg.temperature)
        n = (labels != IGNORE_INDEX).sum()
        ce_sum = F.cross_entropy(student_logits.float().flatten(0, 1), hard.flatten(), reduction="sum")
        loss = (1 - cfg.alpha) * divergence * n + (cfg.alpha * ce_sum if cfg.alpha else 0.0)
        metrics = {NUM_TOKENS: n, "divergence": divergence.detach(),
                   "data_ce": ce_sum.detach() / (hard != IGNORE_INDEX).sum().clamp_min(1)}
        return loss, metrics
    return loss_fn


# ---------------------------------------------------------------------------- the two runs


@command_line
def main(argv=None) -> dict:
    args = parse(argv, RECIPES, "distillation", prog="python -m training.distillation.train",
                 about="Distil a trained teacher into a smaller student, beside the same student trained from scratch")
    t_start = time.perf_counter()
    cfg, train_cfg, block = args.recipe.model, args.recipe.train, args.recipe.train.block_size
    check_method(cfg, train_cfg)
    baseline_out = args.out / "baseline"
    resume_baseline = args.resume and (baseline_out / checkpointing.STATE_FILE).is_file()
    if cfg.baseline and not resume_baseline:
        checkpointing.check_fresh(baseline_out)

    teacher_path = teacher_dir(args)
    device = resolve_device(train_cfg.device)
    teacher = registry.from_pretrained(teacher_path, device=device)
    tokenizer = Tokenizer.from_file(teacher_path)
    data = load_data(args.recipe.data, args.saved_record, args.out, tokenizer=tokenizer, whose="the teacher's")
    data.check_fits(block)
    warn_if_other_corpus(teacher_path, data)
    student = make_student(cfg, train_cfg, teacher, teacher_path, tokenizer)
    initial = copy.deepcopy(student) if cfg.baseline else None  # the baseline starts from the same weights
    n_teacher, n_student = (sum(p.numel() for p in m.parameters()) for m in (teacher, student))
    cpt = data.tokens.val_chars_per_token
    teacher_nats = evaluate_split(teacher, data.tokens.val, block, device=device) / cpt
    before = evaluate_split(student.to(device), data.tokens.val, block, device=device) / cpt
    say(f"teacher: {teacher_path}, {n_teacher:,} parameters, {teacher_nats:.4f} validation nats/char")
    say(f"student: {registry.family_of(student)}, {n_student:,} parameters ({n_teacher / n_student:.1f}x fewer), "
        f"{before:.4f} nats/char before training; distilling with {cfg.kind}"
        + (f" (beta {cfg.beta})" if cfg.kind == "jsd" else "") + f" at temperature {cfg.temperature}"
        + (f", alpha {cfg.alpha}" if cfg.alpha else "") + (f", on-policy {cfg.on_policy}" if cfg.on_policy else "")
        + f", {train_cfg.max_steps} steps into {args.out}" + (" (resumed)" if args.resume else ""))
    t_prep = time.perf_counter() - t_start

    method = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "baseline"}  # --baseline changes nothing here
    record = {"model": dataclasses.asdict(student.config), "data": dataclasses.asdict(args.recipe.data),
              **data.record()}
    contract = registry.family(registry.family_of(student))
    save_model = checkpoint_saver(contract.save_pretrained, tokenizer)
    curve = ValidationCurve(args.out, data, train_cfg, args.resume)
    if not args.resume:
        if is_main_process():  # the loop does the same in train(); here first, for the step-0 point
            checkpointing.start_fresh(args.out)
        curve.record(0, student)
    # A mixture-of-experts student keeps its family's auxiliary losses and router-bias update; the
    # family's hook runs before the curve's measurement, as in the baseline.
    result = train(student, with_aux_loss(make_loss(cfg), student), distillation_batches(data, cfg, block), train_cfg,
                   args.out, save_model=save_model, resume=args.resume, on_step=family_on_step(student, curve),
                   frozen={"teacher": teacher},
                   config_record={**record, "method": method, "teacher": {"path": str(teacher_path),
                                                                          "model": dataclasses.asdict(teacher.config)}},
                   loss_label=f"train loss ({cfg.kind})")
    summary = final_report(student, data, args, result, registry.from_pretrained, t_start, t_prep)
    curves = {"distilled student": curve.points}

    if cfg.baseline:
        say(f"baseline: the same student from the same weights, {train_cfg.max_steps} steps on the same tokens "
            f"with its family's own loss, into {baseline_out}")
        t_base = time.perf_counter()
        base_curve = ValidationCurve(baseline_out, data, train_cfg, resume_baseline)
        if not resume_baseline:
            if is_main_process():
                checkpointing.start_fresh(baseline_out)
            base_curve.record(0, initial.to(device))
        base_result = train(initial, contract.loss, data.batches(block), train_cfg, baseline_out, save_model=save_model,
                            resume=resume_baseline, on_step=family_on_step(initial, base_curve),
                            val_units_per_token=1.0 / cpt,
                            config_record={**record, "method": "baseline: the family's loss on the data"})
        base_summary = final_report(initial, data, dataclasses.replace(args, out=baseline_out), base_result,
                                    registry.from_pretrained, t_base, 0.0, sample=False)
        curves["student from scratch"] = base_curve.points
    if not is_main_process():
        return {}
    summary.update({"family": registry.family_of(student), "teacher": str(teacher_path),
                    "teacher_parameters": n_teacher, "teacher_val_nats_per_char": teacher_nats,
                    "student_val_nats_per_char_before": before, "method": method,
                    "total_s": time.perf_counter() - t_start})
    line = (f"validation nats/char (whole split): teacher {teacher_nats:.4f} ({n_teacher:,} parameters); "
            f"distilled student {summary['val_nats_per_char']:.4f} ({n_student:,} parameters, {before:.4f} before)")
    if cfg.baseline:
        summary["baseline_val_nats_per_char"] = base_summary["val_nats_per_char"]
        summary["baseline_train_s"] = base_summary["train_s"]
        line += f"; the same student from scratch {base_summary['val_nats_per_char']:.4f}"
    atomic_write_json(args.out / "summary.json", summary)
    plot_runs(curves, teacher_nats, args.out / "distillation.png",
              f"{n_student:,}-parameter student of a {n_teacher:,}-parameter teacher, {data.corpus.name}")
    say(line)
    say(f"---- distillation.png, summary.json in {args.out}; {summary['total_s']:.0f} s in all "
        f"({summary['device']}) ----")
    return summary


if __name__ == "__main__":
    main()
