"""The command line that every architecture's generate.py shares.

    python -m architectures.<name>.generate --checkpoint DIR --prompt TEXT [--max-new-tokens N]
        [--temperature T] [--top-k K] [--top-p P] [--seed S] [--device D] [--no-cache]

DIR is one of our training checkpoints or a Hugging Face-format directory; either way it
must carry a tokenizer.json. Tokens are printed as they are generated.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from inference.generate import stream
from inference.sampling import SamplingParams
from training.tokenizer import Tokenizer


def main(family: str, from_pretrained, argv=None) -> str:
    p = argparse.ArgumentParser(prog=f"python -m architectures.{family}.generate")
    p.add_argument("--checkpoint", required=True, help="directory with config.json, *.safetensors, tokenizer.json")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"], help="auto: bf16 on cuda")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence every step (slow reference)")
    args = p.parse_args(argv)
    try:
        params = SamplingParams(args.temperature, args.top_k, args.top_p, args.max_new_tokens, args.seed)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from e
    tok_file = Path(args.checkpoint) / "tokenizer.json"
    if not tok_file.is_file():
        raise SystemExit(f"error: {args.checkpoint} has no tokenizer.json; generation needs the checkpoint's tokenizer")
    tokenizer = Tokenizer.from_file(tok_file)
    dtype = torch.bfloat16 if args.dtype == "bf16" or (args.dtype == "auto" and args.device.startswith("cuda")) else torch.float32
    model = from_pretrained(args.checkpoint, dtype=dtype, device=args.device)
    eos = model.config.eos_token_id
    stop_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_id is not None:
        stop_ids.add(tokenizer.eos_id)
    prompt_ids = tokenizer.encode(args.prompt)
    if tokenizer.kind == "pretrained" and tokenizer.bos_id is not None:
        prompt_ids = [tokenizer.bos_id] + prompt_ids  # published models were trained with a leading bos
    sys.stdout.write(args.prompt)
    new: list[int] = []
    shown = ""
    for token in stream(model, prompt_ids, params, stop_ids=stop_ids, use_cache=not args.no_cache):
        new.append(token)
        # Decode the whole continuation each time: a multi-byte character can span several tokens.
        text = tokenizer.decode([t for t in new if t not in stop_ids])
        if text.endswith("\ufffd"):
            continue  # an incomplete UTF-8 character: wait for its remaining bytes
        sys.stdout.write(text[len(shown):])
        sys.stdout.flush()
        shown = text
    sys.stdout.write("\n")
    return args.prompt + shown
