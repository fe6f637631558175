"""Quality of weight-only quantization: validation nats per character of a trained checkpoint, per format.

    python -m inference.benchmarks.quantized_weights --checkpoint DIR [--corpus tinyshakespeare]

Loads the checkpoint (with its tokenizer.json), scores the corpus's validation split (its last
10%, read whole in non-overlapping windows: `evaluate_split`) in full precision, then with every
linear layer but the head quantized in place (`quantize`: int8 per row, int4 and NF4 in groups of
64, NF4 with double quantization), and prints one line per format with the relative change.
"""

from __future__ import annotations

import json

from architectures import registry
from architectures.utils.command_line import ArgumentParser, command_line
from architectures.utils.device import add_device_option, resolve_device
from inference.quantized_linear import quantize
from training.data import prepare_data
from training.lm import evaluate_split
from training.tokenizer import Tokenizer

FORMATS = [("int8", None, False), ("int4", 64, False), ("nf4", 64, False), ("nf4", 64, True)]


@command_line
def main(argv=None) -> list[dict]:
    ap = ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True, help="a checkpoint directory with tokenizer.json")
    ap.add_argument("--corpus", default="tinyshakespeare", help="the corpus whose last 10%% is scored")
    ap.add_argument("--block-size", type=int, default=256)
    add_device_option(ap)
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    tokenizer = Tokenizer.from_file(args.checkpoint)
    tokens = prepare_data(args.corpus, tokenizer)
    per_char = 1.0 / tokens.val_chars_per_token
    base = None
    rows = []
    for fmt, group, dq in [("none", None, False)] + FORMATS:
        model = registry.from_pretrained(args.checkpoint, device=device)
        if fmt != "none":
            quantize(model, fmt, group_size=group, double_quant=dq)
        nats = evaluate_split(model, tokens.val, args.block_size, device=device) * per_char
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
