"""Generate text from any checkpoint the zoo loads: one command for every family.

    python -m inference.generate --checkpoint DIR --prompt TEXT [--max-new-tokens N]
        [--temperature T] [--top-k K] [--top-p P] [--seed S] [--device D] [--dtype D] [--no-cache]
        [--kv-dtype auto|int8|int4|fp8|bf16|fp16|fp32]

DIR is one of our training checkpoints or a Hugging Face-format directory of any family the
registry lists (its config.json's model_type picks it); either way it must carry a tokenizer.json. Tokens are printed as they are generated. A prompt that leaves
less room in the model's context than --max-new-tokens asks for generates what fits; a prompt
longer than the whole context keeps its last tokens (as nanoGPT's sampler crops to block_size).
Either way one `note:` line on stderr says so.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from architectures import registry
from architectures.utils.command_line import ArgumentParser, command_line
from inference.quantized_kv import valid_kv_dtypes
from inference.sampling import SamplingParams, eos_ids, stream
from architectures.utils.device import add_device_option, add_dtype_option, compute_dtype, resolve_device
from training.tokenizer import Tokenizer


def fit_to_context(prompt_ids: list[int], max_new_tokens: int, context: int,
                   keep_first: int = 0) -> tuple[list[int], int, str | None]:
    """(prompt ids, new tokens, note): what of the request fits in `context` positions.

    A prompt that leaves room for fewer new tokens than asked keeps every token and gets the
    room there is. A prompt that fills the whole context keeps its last tokens: room for the
    new tokens asked, but never less than half the context, so the continuation still sees a
    good part of the prompt. `keep_first` tokens at the start (a bos) are kept in front.
    """
    P = len(prompt_ids)
    if P + max_new_tokens <= context:
        return prompt_ids, max_new_tokens, None
    if P < context:
        return prompt_ids, context - P, (f"the prompt has {P} tokens and the model's context is {context}: "
                                         f"generating {context - P} new tokens, not {max_new_tokens}")
    keep = max(context - max_new_tokens, context // 2, keep_first + 1)
    cropped = prompt_ids[:keep_first] + prompt_ids[P - (keep - keep_first):]
    new = context - keep
    more = "" if new == max_new_tokens else f", and generating {new} new tokens, not {max_new_tokens}"
    return cropped, new, (f"the prompt has {P} tokens and the model's context is {context}: "
                          f"keeping its last {keep - keep_first} tokens{more}")


@command_line
def main(argv=None) -> str:
    p = ArgumentParser(prog="python -m inference.generate",
                       description="Continue a prompt with any checkpoint the zoo loads, printing tokens as they come.")
    # default=SUPPRESS: a required option has no default, and --help should not show "(default: None)".
    p.add_argument("--checkpoint", required=True, default=argparse.SUPPRESS,
                   help="directory with config.json, model.safetensors (or shards) and tokenizer.json")
    p.add_argument("--prompt", required=True, default=argparse.SUPPRESS,
                   help="text to continue, encoded with the checkpoint's tokenizer")
    p.add_argument("--max-new-tokens", type=int, default=200,
                   help="tokens to generate at most (fewer if the prompt leaves less room in the context)")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="divides the logits: 0 = greedy, < 1 sharper, > 1 flatter")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens only; 0 = all")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="sample among the fewest tokens whose probability sums to p; 1 = all")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the sampler: same seed, same text; None = a different text each run")
    add_device_option(p)
    add_dtype_option(p, help="weights' number format; auto: bf16 on a GPU, fp32 on the CPU")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence every step (slow reference)")
    p.add_argument("--kv-dtype", default="auto", choices=["auto", *valid_kv_dtypes()],
                   help="how the KV cache stores keys and values: quantized int8/fp8 (a scale per token and head) "
                        "or int4 (KIVI), or a plain dtype; auto: the weights' dtype")
    args = p.parse_args(argv)
    args.kv_dtype = None if args.kv_dtype == "auto" else args.kv_dtype
    if args.kv_dtype is not None and args.no_cache:
        raise ValueError("--kv-dtype sets how the KV cache stores keys and values, and --no-cache keeps none; "
                         "drop one of them")
    params = SamplingParams(args.temperature, args.top_k, args.top_p, args.max_new_tokens, args.seed)
    device = resolve_device(args.device)
    dtype = compute_dtype(args.dtype, device)
    checkpoint = Path(args.checkpoint)
    if not checkpoint.exists():
        raise FileNotFoundError(f"checkpoint directory {checkpoint} does not exist")
    if not checkpoint.is_dir():
        raise NotADirectoryError(f"--checkpoint {checkpoint} is a file; give the directory that holds config.json")
    tok_file = checkpoint / "tokenizer.json"
    if not tok_file.is_file():
        raise FileNotFoundError(f"{checkpoint} has no tokenizer.json; generation needs the checkpoint's tokenizer")
    tokenizer = Tokenizer.from_file(tok_file)
    model = registry.from_pretrained(checkpoint, dtype=dtype, device=device)
    stop_ids = eos_ids(model.config.eos_token_id)
    if tokenizer.eos_id is not None:
        stop_ids.add(tokenizer.eos_id)
    prompt_ids = tokenizer.encode(args.prompt)
    if not prompt_ids:
        raise ValueError("--prompt is empty: give some text to continue")
    bos = tokenizer.kind == "pretrained" and tokenizer.bos_id is not None
    if bos:
        prompt_ids = [tokenizer.bos_id] + prompt_ids  # published models were trained with a leading bos
    # The library's `stream` refuses a request that does not fit; a person at a terminal would
    # rather get what fits, told so before the prompt is printed.
    prompt_ids, max_new, note = fit_to_context(prompt_ids, args.max_new_tokens, model.config.max_position_embeddings,
                                               keep_first=int(bos))
    if note:
        print(f"note: {note}", file=sys.stderr, flush=True)
        params = SamplingParams(args.temperature, args.top_k, args.top_p, max_new, args.seed)
    sys.stdout.write(args.prompt)
    new: list[int] = []
    shown = ""
    for token in stream(model, prompt_ids, params, stop_ids=stop_ids, use_cache=not args.no_cache,
                        kv_dtype=args.kv_dtype):
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


if __name__ == "__main__":
    main()
