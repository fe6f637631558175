"""Quality of weight-only quantization: validation nats per character of a trained checkpoint, per format.

    python -m inference.benchmarks.quantized_weights --checkpoint DIR [--corpus tinyshakespeare]

Loads the checkpoint (with its tokenizer.json), scores the corpus's validation split (its last
10%, read whole in non-overlapping windows of --block-size tokens: `evaluate_split`) in full
precision, then with every linear layer but the head quantized in place (`quantize`: int8 per row,
int4 and NF4 in groups of --group-size inputs, 64 by default, NF4 with double quantization), and prints one line per format with
the relative change. The windows default to the block size the checkpoint was trained with (its
training record, trainer_state.pt), which is what its training run's own validation figure used;
a checkpoint without one (a download) is read in windows of its whole context.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from architectures import registry
from architectures.utils.command_line import ArgumentParser, command_line
from architectures.utils.device import add_device_option, resolve_device
from inference.checkpoint_files import check_checkpoint, trained_block_size
from inference.command_checks import check_at_least
from inference.quantized_linear import check_quantizable, quantize
from training.data import prepare_data
from training.lm import evaluate_split
from training.tokenizer import Tokenizer

# (format, grouped, double quantization): int8 keeps one scale per row, the others one per --group-size inputs
FORMATS = [("int8", False, False), ("int4", True, False), ("nf4", True, False), ("nf4", True, True)]


def block_size(checkpoint: Path, given: int | None, context: int) -> tuple[int, str]:
    """(the window to score in, why): --block-size, else the trained block size, else the model's context."""
    if given is not None:
        check_at_least(("--block-size", given, 1))
        if given > context:
            raise ValueError(f"--block-size {given} is longer than the model's context (max_position_embeddings="
                             f"{context}); pass at most {context}, or leave it out for the trained block size")
        return given, "--block-size"
    trained = trained_block_size(checkpoint)
    if trained is not None:
        return min(trained, context), f"the block size {checkpoint} was trained with"
    return context, f"the model's max_position_embeddings ({checkpoint} has no training record)"


@command_line
def main(argv=None) -> list[dict]:
    ap = ArgumentParser(prog="python -m inference.benchmarks.quantized_weights", description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True, default=argparse.SUPPRESS,
                    help="a checkpoint directory: config.json, model.safetensors and tokenizer.json")
    ap.add_argument("--corpus", default="tinyshakespeare",
                    help="the corpus whose last 10%% is scored: tinyshakespeare, a .txt/.json/.jsonl file or a hub "
                         "dataset name")
    ap.add_argument("--block-size", type=int, default=argparse.SUPPRESS,
                    help="tokens per scored window (default: the block size the checkpoint was trained with, from "
                         "its trainer_state.pt, else its max_position_embeddings)")
    ap.add_argument("--group-size", type=int, default=64,
                    help="inputs per scale of int4 and NF4 (int8 has one scale per row); must divide every "
                         "quantized layer's in_features")
    add_device_option(ap)
    args = ap.parse_args(argv)
    check_at_least(("--group-size", args.group_size, 1))
    device = resolve_device(args.device)
    checkpoint = check_checkpoint(args.checkpoint, why_tokenizer="the corpus is encoded with the checkpoint's "
                                                                 "own tokenizer")
    model = registry.from_pretrained(checkpoint, device=device)
    block, why = block_size(checkpoint, getattr(args, "block_size", None), model.config.max_position_embeddings)
    for fmt, grouped, dq in FORMATS:  # every format must fit the model before the first one is scored
        try:
            check_quantizable(model, fmt, args.group_size if grouped else None, double_quant=dq)
        except ValueError as e:
            raise ValueError(f"{checkpoint} cannot be quantized to {fmt} with --group-size {args.group_size}: {e}") \
                from e
    print(f"block size {block}: {why}", flush=True)
    tokenizer = Tokenizer.from_file(checkpoint)
    tokens = prepare_data(args.corpus, tokenizer)
    per_char = 1.0 / tokens.val_chars_per_token
    base = None
    rows = []
    for fmt, grouped, dq in [("none", False, False)] + FORMATS:
        model = model or registry.from_pretrained(checkpoint, device=device)
        group = args.group_size if grouped else None
        if fmt != "none":
            quantize(model, fmt, group_size=group, double_quant=dq)
        nats = evaluate_split(model, tokens.val, block, device=device) * per_char
        model = None  # quantized in place: the next format starts from the file again
        base = nats if base is None else base
        row = {"format": fmt + (" + double quant" if dq else ""), "group": group, "nats_per_char": nats,
               "relative_change": nats / base - 1}
        rows.append(row)
        print("RESULT " + json.dumps(row), flush=True)
    print(f"\n{'weights':22s} {'group':>6s} {'nats/char':>10s} {'change':>8s}")
    for r in rows:
        print(f"{r['format']:22s} {str(r['group']):>6s} {r['nats_per_char']:10.4f} {r['relative_change']:+8.2%}")
    return rows


if __name__ == "__main__":
    main()
