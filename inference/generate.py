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
Loading, the chat format and the text <-> ids rules are training/inference_setup.py's, which
`python -m inference.serve` shares, so that a server's greedy answer is byte for byte what this prints.

--adapter DIR samples from a base model with a LoRA adapter (PEFT's format, as training.lora.train
writes it) merged into its weights: the base is --checkpoint, or the local folder the adapter
records as its base_model_name_or_path; the tokenizer is the adapter folder's, else the base's.
"""

from __future__ import annotations

import argparse
import sys

from architectures.utils.command_line import ArgumentParser, command_line
from architectures.utils.device import add_device_option, add_dtype_option, compute_dtype, resolve_device
from inference.quantized_kv import valid_kv_dtypes
from inference.sampling import SamplingParams, stream
from training.inference_setup import TextCodec, chat_for, load_checkpoint
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
    model, tokenizer, folders = load_checkpoint(args.checkpoint, args.adapter, device, dtype)
    fmt = chat_for(args.chat, tokenizer, folders)
    codec = TextCodec(tokenizer, model.config, fmt)  # the same text <-> ids as python -m inference.serve
    if not tokenizer.encode(args.prompt):
        raise ValueError("--prompt is empty: give some text to continue")
    if fmt is not None:
        prompt_ids, stop_ids = codec.chat_prompt([{"role": "user", "content": args.prompt}]), codec.chat_stop_ids
    else:
        prompt_ids, stop_ids = codec.completion_prompt(args.prompt), codec.completion_stop_ids
    # The library's `stream` refuses a request that does not fit; a person at a terminal would
    # rather get what fits, told so before the prompt is printed.
    keep_first = codec.chat_begin_len if fmt is not None else len(codec.bos)
    prompt_ids, max_new, note = fit_to_context(prompt_ids, args.max_new_tokens, model.config.max_position_embeddings,
                                               keep_first=keep_first)
    if note:
        print(f"note: {note}", file=sys.stderr, flush=True)
        params = SamplingParams(args.temperature, args.top_k, args.top_p, max_new, args.seed)
    tokens = stream(model, prompt_ids, params, stop_ids=stop_ids, use_cache=not args.no_cache, kv_dtype=args.kv_dtype)
    if fmt is not None:  # the reply alone
        return show(tokens, tokenizer, codec.chat_hidden)
    sys.stdout.write(args.prompt)
    return args.prompt + show(tokens, tokenizer, codec.completion_hidden)


if __name__ == "__main__":
    main()
