"""Serve any checkpoint the zoo loads over an OpenAI-compatible HTTP API, on the paged engine.

    python -m inference.serve --checkpoint DIR [--host 127.0.0.1] [--port 8000] [--max-num-seqs N]
        [--num-blocks N] [--kv-dtype auto|int8|int4|fp8|bf16|fp16|fp32] [--api-key KEY] [--device D] [--dtype D]
    python -m inference.serve --checkpoint runs/sft-tiny --port 8000
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"messages": [{"role": "user", "content": "What is 12 + 30?"}], "temperature": 0}'

DIR is what `python -m inference.generate` takes (a zoo training checkpoint or a Hugging Face-format
folder with a tokenizer.json; --adapter DIR merges a LoRA adapter), loaded the same way
(training/inference_setup.py), so that a greedy answer here is byte for byte what generate prints.
Routes, parameters and errors: inference/server.py and inference/openai_api.py; how a request travels
and what load it holds: notes/serving.md. `python -m inference.chat --url http://127.0.0.1:8000` talks to it.
"""

from __future__ import annotations

import argparse

import uvicorn

from architectures.utils.command_line import ArgumentParser, command_line
from architectures.utils.device import compute_dtype, resolve_device
from inference.command_checks import add_engine_options, engine_config
from training.inference_setup import load_checkpoint, server_app


def parse_args(argv) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m inference.serve",
                       description="An OpenAI-compatible server (/v1/completions, /v1/chat/completions) on the paged "
                                   "engine, for any checkpoint the zoo loads.")
    p.add_argument("--checkpoint", required=True, default=argparse.SUPPRESS,
                   help="directory with config.json, the weights and tokenizer.json (as python -m inference.generate)")
    p.add_argument("--adapter", default=None, help="a LoRA adapter folder to merge into the model before serving")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on the /v1/ routes; None: anyone may ask")
    p.add_argument("--model-name", default=None,
                   help="the model id clients send and GET /v1/models lists; None: --checkpoint as given")
    add_engine_options(p)
    args = p.parse_args(argv)
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    return args


@command_line
def main(argv=None) -> None:
    args = parse_args(argv)
    config = engine_config(args)
    device = resolve_device(args.device)
    model, tokenizer, folders = load_checkpoint(args.checkpoint, args.adapter, device, compute_dtype(args.dtype, device))
    name = args.model_name or args.checkpoint
    app = server_app(model, tokenizer, folders, name, config, args.api_key)
    engine = app.state.loop.engine
    print(f"serving {name} on http://{args.host}:{args.port}/v1 ({device}, {engine.blocks.num_blocks} KV blocks of "
          f"{engine.blocks.block_size} tokens, up to {config.max_num_seqs} sequences per step)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
