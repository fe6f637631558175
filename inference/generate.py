"""Generate text from any checkpoint the zoo loads: one command for every family.

    python -m inference.generate --checkpoint DIR --prompt TEXT [--max-new-tokens N]
        [--temperature T] [--top-k K] [--top-p P] [--seed S] [--device D] [--dtype D] [--no-cache]
        [--kv-dtype auto|int8|int4|fp8|bf16|fp16|fp32] [--adapter DIR] [--chat | --no-chat]
    python -m inference.generate --checkpoint runs/sft-tiny --prompt "What is 12 + 30?"   # prints the reply alone
    python -m inference.generate --adapter runs/lora-tiny --prompt "What is 12 + 30?"    # on the base it records

DIR is one of our training checkpoints or a Hugging Face-format directory of any family the
registry lists (its config.json's model_type picks it); either way it must carry a tokenizer.json.
Tokens are printed as they are generated. A prompt that leaves less room in the model's context
than --max-new-tokens asks for generates what fits; a prompt longer than the whole context keeps
its last tokens (as nanoGPT's sampler crops to block_size). Either way one `note:` line on stderr
says so.

--chat asks the way a chat model was fine-tuned to be asked: the prompt becomes one user turn in
the chat format of the checkpoint's tokenizer (training/chat.py: the zoo's <|user|> ... <|eos|>
<|assistant|>, or Llama 3's headers), generation stops at the format's end of turn, and only the
reply is printed, without special tokens. It is on by default for a checkpoint (or adapter) that
training.sft, training.dpo, training.grpo or training.lora wrote, in the format their training record
names (inference/checkpoint_files.py: `recorded_chat_format`); --no-chat sends the prompt as plain text.

--adapter DIR samples from a base model with a LoRA adapter (PEFT's format, as training.lora.train
writes it) merged into its weights: the base is --checkpoint, or the local folder the adapter
records as its base_model_name_or_path; the tokenizer is the adapter folder's, else the base's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from safetensors import safe_open

from architectures import registry
from architectures.utils.command_line import ArgumentParser, command_line
from architectures.utils.device import add_device_option, add_dtype_option, compute_dtype, resolve_device
from inference.checkpoint_files import TOKENIZER_FILE, adapter_base, check_adapter, check_checkpoint, recorded_chat_format
from inference.quantized_kv import valid_kv_dtypes
from inference.sampling import SamplingParams, eos_ids, stream
from training.chat import ChatFormat, chat_format
from training.lora import load_adapter, merge
from training.lora.lora import find_targets
from training.lora.peft_format import PREFIX, WEIGHTS_FILE, expected_shapes, read_adapter_config
from training.tokenizer import Tokenizer

CHAT_HELP = ("send --prompt as one user turn in the chat format of the checkpoint's tokenizer, stop at its end of "
             "turn and print the reply alone. --chat is on by default for checkpoints written by training.sft/dpo/"
             "grpo/lora (their training record says so); --no-chat turns it off (default: on for those, else off)")


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


def parse_args(argv) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m inference.generate",
                       description="Continue a prompt with any checkpoint the zoo loads, printing tokens as they come.")
    # default=SUPPRESS: a required option has no default, and --help should not show "(default: None)".
    p.add_argument("--checkpoint", default=argparse.SUPPRESS,
                   help="directory with config.json, model.safetensors (or shards) and tokenizer.json; with --adapter, "
                        "the base model (default: the base the adapter records)")
    p.add_argument("--adapter", default=argparse.SUPPRESS,
                   help="a LoRA adapter folder (adapter_config.json + adapter_model.safetensors, as training.lora.train "
                        "or PEFT writes it), merged into the base model before sampling")
    p.add_argument("--prompt", required=True, default=argparse.SUPPRESS,
                   help="text to continue (with --chat: the user's message), encoded with the checkpoint's tokenizer")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=CHAT_HELP)
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
    for name in ("checkpoint", "adapter", "chat"):
        setattr(args, name, getattr(args, name, None))
    args.kv_dtype = None if args.kv_dtype == "auto" else args.kv_dtype
    if args.kv_dtype is not None and args.no_cache:
        raise ValueError("--kv-dtype sets how the KV cache stores keys and values, and --no-cache keeps none; "
                         "drop one of them")
    if args.checkpoint is None and args.adapter is None:
        raise ValueError("give --checkpoint DIR (a model folder), or --adapter DIR (a LoRA adapter, whose base model "
                         "it records)")
    return args


def load(args, device, dtype) -> tuple:
    """(model, tokenizer, the folders they came from): the checkpoint, or the base with --adapter merged in."""
    adapter = check_adapter(args.adapter) if args.adapter else None
    base = Path(args.checkpoint) if args.checkpoint else adapter_base(adapter)
    own_tokenizer = adapter is not None and (adapter / TOKENIZER_FILE).is_file()
    check_checkpoint(base, "--checkpoint" if args.checkpoint else f"--adapter {adapter}'s base",
                     why_tokenizer=None if own_tokenizer else "generation needs the checkpoint's tokenizer",
                     adapter_hint="pass it as --adapter DIR (with its base model as --checkpoint DIR if it records none)")
    tokenizer = Tokenizer.from_file((adapter if own_tokenizer else base) / TOKENIZER_FILE)
    if adapter is None:
        return registry.from_pretrained(base, dtype=dtype, device=device), tokenizer, [base]
    model = registry.from_pretrained(base, device=device)  # fp32: the adapter is merged at full precision
    check_adapter_fits(model, adapter, base)
    merge(load_adapter(model, adapter))
    return model.to(dtype), tokenizer, [base, adapter]


def check_adapter_fits(model, adapter: Path, base: Path) -> None:
    """The adapter's tensors must be those its target modules need on this base, of the same shapes: else one
    short line with the first difference and their count (load_adapter would list every tensor)."""
    config = read_adapter_config(adapter)
    shapes = {n.removeprefix(PREFIX): s for n, s in expected_shapes(model, find_targets(model, config), config).items()}
    try:
        with safe_open(str(adapter / WEIGHTS_FILE), framework="pt") as f:
            found = {k.removeprefix(PREFIX): tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception:  # missing, truncated or corrupt: load_adapter says which
        return
    diffs = ([f"{n} is not in the adapter" for n in shapes if n not in found]
             + [f"{n} adapts no module of the base" for n in found if n not in shapes]
             + [f"{n}: adapter {found[n]} vs base {s}" for n, s in shapes.items() if n in found and found[n] != s])
    if diffs:
        more = f" (and {len(diffs) - 1} more differences)" if len(diffs) > 1 else ""
        raise ValueError(f"--adapter {adapter} does not fit the base model {base}: {diffs[0]}{more}; pass the model it "
                         f"was trained on as --checkpoint")


def chat_for(args, tokenizer: Tokenizer, folders: list[Path]) -> ChatFormat | None:
    """The chat format to wrap the prompt in, or None for plain text: --chat / --no-chat, else on for the
    folders a chat method wrote (in the format that run used, if it named one)."""
    name = next(filter(None, (recorded_chat_format(f) for f in reversed(folders))), None)
    if not (args.chat if args.chat is not None else name is not None):
        return None
    return chat_format(tokenizer, name)


def special_ids(tokenizer: Tokenizer) -> set[int]:
    """The ids of the tokenizer's special tokens (<|eos|>, <|user|>, ...): never printed as a chat reply."""
    return {i for i, t in tokenizer.backend.get_added_tokens_decoder().items() if t.special}


def show(tokens, tokenizer: Tokenizer, hidden: set[int]) -> str:
    """Print the text of `tokens` as they come (leaving out `hidden` ids) and a newline; returns the text."""
    new: list[int] = []
    shown = ""
    for token in tokens:
        new.append(token)
        # Decode the whole continuation each time: a multi-byte character can span several tokens.
        text = tokenizer.decode([t for t in new if t not in hidden])
        if text.endswith("\ufffd"):
            continue  # an incomplete UTF-8 character: wait for its remaining bytes
        sys.stdout.write(text[len(shown):])
        sys.stdout.flush()
        shown = text
    sys.stdout.write("\n")
    return shown


@command_line
def main(argv=None) -> str:
    args = parse_args(argv)
    params = SamplingParams(args.temperature, args.top_k, args.top_p, args.max_new_tokens, args.seed)
    device = resolve_device(args.device)
    dtype = compute_dtype(args.dtype, device)
    model, tokenizer, folders = load(args, device, dtype)
    fmt = chat_for(args, tokenizer, folders)
    stop_ids = eos_ids(model.config.eos_token_id) | set(fmt.stop_ids if fmt else ())
    if tokenizer.eos_id is not None:
        stop_ids.add(tokenizer.eos_id)
    prompt_ids = tokenizer.encode(args.prompt)
    if not prompt_ids:
        raise ValueError("--prompt is empty: give some text to continue")
    bos = tokenizer.kind == "pretrained" and tokenizer.bos_id is not None
    if fmt is not None:
        prompt_ids = fmt.prompt([{"role": "user", "content": args.prompt}])
    elif bos:
        prompt_ids = [tokenizer.bos_id] + prompt_ids  # published models were trained with a leading bos
    # The library's `stream` refuses a request that does not fit; a person at a terminal would
    # rather get what fits, told so before the prompt is printed.
    keep_first = len(fmt.begin()) if fmt is not None else int(bos)
    prompt_ids, max_new, note = fit_to_context(prompt_ids, args.max_new_tokens, model.config.max_position_embeddings,
                                               keep_first=keep_first)
    if note:
        print(f"note: {note}", file=sys.stderr, flush=True)
        params = SamplingParams(args.temperature, args.top_k, args.top_p, max_new, args.seed)
    tokens = stream(model, prompt_ids, params, stop_ids=stop_ids, use_cache=not args.no_cache, kv_dtype=args.kv_dtype)
    if fmt is not None:  # the reply alone
        return show(tokens, tokenizer, stop_ids | special_ids(tokenizer))
    sys.stdout.write(args.prompt)
    return args.prompt + show(tokens, tokenizer, stop_ids)


if __name__ == "__main__":
    main()
