"""Chat with a model in the terminal: the reply streams in as it is generated, the conversation is kept.

    python -m inference.chat --checkpoint runs/sft-tiny            # starts the server in this process
    python -m inference.chat --url http://127.0.0.1:8000            # talks to python -m inference.serve
    python -m inference.chat --checkpoint runs/sft-tiny --temperature 0 --system "Answer with a number."

Type a message and press Enter. Commands: /reset forgets the conversation (the system prompt stays),
/system TEXT sets the system prompt (and starts over), /system alone clears it, /quit (or Ctrl-D) ends.
Ctrl-C during a reply stops it (the server frees its sequence at once) and keeps what came.

Either way the chat is a client of the server's /v1/chat/completions (inference/server.py), so what is
typed here is asked exactly as an API client would ask it: in the checkpoint's chat format
(training/inference_setup.py), the zoo's (<|user|> ... <|assistant|>) for the SFT checkpoints the zoo
trains, whose format has no system role: a system prompt goes in front of the first user turn.
"""

from __future__ import annotations

import argparse
import sys

from architectures.utils.command_line import ArgumentParser, command_line
from inference.command_checks import add_engine_options, engine_config
from inference.http_client import EventStream, ServerError, request_json
from inference.server import ServerThread
from training.inference_setup import load_checkpoint, server_app
from architectures.utils.device import compute_dtype, resolve_device

HELP = "commands: /reset (forget the conversation), /system TEXT (set the system prompt), /quit"


def parse_args(argv) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m inference.chat", description="Chat with a model in the terminal, streaming.")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--checkpoint", help="a chat checkpoint (as python -m inference.generate takes), served in "
                                            "this process")
    where.add_argument("--url", help="a running server (python -m inference.serve), e.g. http://127.0.0.1:8000")
    p.add_argument("--api-key", default=None, help="the server's --api-key, if it has one")
    p.add_argument("--system", default=None, help="the system prompt to start with")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy; higher, more varied replies")
    p.add_argument("--top-p", type=float, default=1.0, help="sample among the fewest tokens whose probability sums to p")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="longest reply in tokens; None: all the room the model's context leaves")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampler (with the same conversation, same replies)")
    add_engine_options(p)  # used with --checkpoint
    return p.parse_args(argv)


def reply(url: str, messages: list[dict], args, out) -> str:
    """Stream one reply to `out`; returns its text (what came before a Ctrl-C, if one stopped it)."""
    payload = {"messages": messages, "temperature": args.temperature, "top_p": args.top_p}
    payload.update({k: v for k, v in (("max_tokens", args.max_tokens), ("seed", args.seed)) if v is not None})
    text = ""
    with EventStream(url, "/v1/chat/completions", payload, args.api_key) as events:
        try:
            for chunk in events:
                for choice in chunk["choices"]:
                    piece = choice["delta"].get("content") or ""
                    out.write(piece)
                    out.flush()
                    text += piece
        except KeyboardInterrupt:
            out.write(" [stopped]")
    out.write("\n")
    return text


def converse(url: str, args, lines, out) -> list[dict]:
    """The chat loop over input `lines`; returns the conversation as it ended."""
    system = args.system
    history: list[dict] = []
    for line in lines:
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/reset" or line.startswith("/system"):
            if line.startswith("/system"):
                system = line[len("/system"):].strip() or None
            history = []
            out.write(f"(conversation reset{'; system prompt: ' + system if system else ''})\n")
            continue
        if line.startswith("/"):
            out.write(f"unknown command {line.split()[0]}; {HELP}\n")
            continue
        messages = ([{"role": "system", "content": system}] if system else []) + history + [
            {"role": "user", "content": line}]
        try:
            text = reply(url, messages, args, out)
        except ServerError as e:  # a conversation longer than the context, say: the chat goes on
            out.write(f"error: {e}\n")
            continue
        history += [{"role": "user", "content": line}, {"role": "assistant", "content": text}]
    return ([{"role": "system", "content": system}] if system else []) + history


def prompts(stream):
    """Lines typed at a `> ` prompt (or read from a pipe), until end of input."""
    interactive = stream.isatty()
    while True:
        try:
            yield input("> ") if interactive else next(stream)
        except (EOFError, StopIteration):
            return


@command_line
def main(argv=None, lines=None) -> list[dict]:
    args = parse_args(argv)
    server = None
    if args.checkpoint:
        config = engine_config(args)
        device = resolve_device(args.device)
        model, tokenizer, folders = load_checkpoint(args.checkpoint, None, device, compute_dtype(args.dtype, device))
        server = ServerThread(server_app(model, tokenizer, folders, args.checkpoint, config)).start()
    url = server.url if server else args.url.rstrip("/")
    try:
        request_json(url, "GET", "/v1/models", api_key=args.api_key, timeout=30)  # there, and the key fits: say so now
        print(f"chatting with {args.checkpoint or url}; {HELP}", file=sys.stderr)
        return converse(url, args, lines if lines is not None else prompts(sys.stdin), sys.stdout)
    finally:
        if server:
            server.stop()


if __name__ == "__main__":
    main()
