"""The load the server holds: many concurrent streaming clients, every request audited, and the same
workload through the engine directly for comparison.

    python -m inference.benchmarks.serving_load --preset tiny --device cpu                     # 64 clients, 1,000 requests
    python -m inference.benchmarks.serving_load --preset tiny --device cpu --disconnect-fraction 0.2
    python -m inference.benchmarks.serving_load --preset llama-3.2-1b --device cuda --dtype bf16 \\
        --min-prompt 32 --max-prompt 512 --min-new 32 --max-new 256
    python -m inference.benchmarks.serving_load --checkpoint runs/sft-tiny                     # a trained model
    python -m inference.benchmarks.serving_load --url http://127.0.0.1:8000 --vocab-size 512   # a running server

Without --url the script loads the checkpoint (or builds a randomly initialised llama3 of --preset, with a
numbered tokenizer: training/inference_setup.py), starts the server (inference/server.py) in this process
on a free port, and sends --requests completions from --clients threads (inference/benchmarks/
serving_clients.py): prompts of random token ids, lengths uniform in [--min-prompt, --max-prompt], each
with max_tokens uniform in [--min-new, --max-new], greedy and ignoring EOS, streamed. With
--disconnect-fraction F a request's client closes its connection after a random number of chunks with
probability F.

Checked, not just timed: every request answered (one finish reason and [DONE]), none lost or duplicated
(exactly max_tokens tokens each, no answer id twice, nothing after a finish), and the pool back to all free
blocks with nothing running or waiting (GET /health) once the clients are done. Then, in-process and
without disconnects, the server stops and the same prompts and lengths go to its engine at once
(`LLMEngine.generate`, the offline benchmark), and the served texts are compared with the offline ones.

Prints one line per measurement: `bench mode=served ...` (requests/s, time to first token p50/p99 in ms,
output tokens/s), `bench mode=offline ...` and the served/offline tokens/s ratio. The clients run in this
process too (threads, sharing its interpreter with the server), which costs the served figure some
throughput on a small CPU; notes/serving.md gives figures.
"""

from __future__ import annotations

import argparse
import threading
import time

import torch

from architectures import registry
from architectures.utils.command_line import ArgumentParser, UserRuntimeError, command_line
from architectures.utils.device import compute_dtype, device_label, resolve_device
from inference.benchmarks.serving_clients import audit, run_clients, summary
from inference.benchmarks.workloads import make_prompts, sync
from inference.command_checks import add_engine_options, check_at_least, check_preset, engine_config, family_presets
from inference.engine import EngineStats
from inference.http_client import request_json
from inference.sampling import SamplingParams
from inference.server import ServerThread
from training.inference_setup import load_checkpoint, numbered_tokenizer, server_app

FAMILY = "llama3"


def parse_args(argv) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m inference.benchmarks.serving_load", description=__doc__.split("\n\n")[0])
    where = p.add_mutually_exclusive_group()
    where.add_argument("--checkpoint", default=None, help="a checkpoint to serve (as python -m inference.serve takes)")
    where.add_argument("--preset", default=None,
                       help=f"serve a randomly initialised {FAMILY} of this shape ({', '.join(family_presets(FAMILY))}); "
                            f"None with no --checkpoint and no --url: tiny")
    where.add_argument("--url", default=None, help="load a running server instead (no offline comparison)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="token ids of the prompts are drawn below this; default: the model's vocabulary (needed "
                        "with --url)")
    p.add_argument("--api-key", default=None, help="the --url server's key, if it has one")
    p.add_argument("--clients", type=int, default=64, help="concurrent streaming clients")
    p.add_argument("--requests", type=int, default=1000, help="requests in all")
    p.add_argument("--min-prompt", type=int, default=8, help="shortest prompt, in tokens")
    p.add_argument("--max-prompt", type=int, default=64, help="longest prompt, in tokens")
    p.add_argument("--min-new", type=int, default=8, help="fewest tokens a request asks for (max_tokens)")
    p.add_argument("--max-new", type=int, default=64, help="most tokens a request asks for (max_tokens)")
    p.add_argument("--disconnect-fraction", type=float, default=0.0,
                   help="share of requests whose client disconnects mid-stream, at a random chunk")
    p.add_argument("--seed", type=int, default=0, help="seed of the workload, the disconnects and the random model")
    p.add_argument("--no-offline", action="store_true", help="skip the offline engine run on the same workload")
    add_engine_options(p)
    args = p.parse_args(argv)
    check_at_least(("--clients", args.clients, 1), ("--requests", args.requests, 1), ("--min-prompt", args.min_prompt, 1),
                   ("--min-new", args.min_new, 1), ("--max-prompt", args.max_prompt, args.min_prompt),
                   ("--max-new", args.max_new, args.min_new))
    if not 0.0 <= args.disconnect_fraction <= 1.0:
        raise ValueError(f"--disconnect-fraction must be in [0, 1], got {args.disconnect_fraction}")
    if args.url and args.vocab_size is None:
        raise ValueError("--url needs --vocab-size: the prompts' token ids must be below the served model's vocabulary")
    if args.preset is not None:
        check_preset(FAMILY, args.preset)
    if not (args.checkpoint or args.url or args.preset):
        args.preset = "tiny"
    return args


def workload(args, vocab: int) -> tuple[list[list[int]], list[int]]:
    prompts = make_prompts(args.requests, args.min_prompt, args.max_prompt, vocab, seed=args.seed)
    g = torch.Generator().manual_seed(args.seed + 1)
    return prompts, torch.randint(args.min_new, args.max_new + 1, (args.requests,), generator=g).tolist()


def build_app(args):
    """(the server's app, a label of what it serves): the checkpoint, or a random model of --preset."""
    config = engine_config(args)
    device = resolve_device(args.device)
    dtype = compute_dtype(args.dtype, device)
    if args.checkpoint:
        model, tokenizer, folders = load_checkpoint(args.checkpoint, None, device, dtype)
        name = args.checkpoint
    else:
        torch.manual_seed(args.seed)
        with torch.device(device):  # initialised on the device: a 1B model's random init on a CPU takes long
            model = registry.model_class(FAMILY)(registry.package(FAMILY).preset(args.preset))
        model, tokenizer, folders, name = model.to(dtype).eval(), numbered_tokenizer(model.config.vocab_size), [], args.preset
    longest = args.max_prompt + args.max_new
    if longest > model.config.max_position_embeddings:
        raise ValueError(f"--max-prompt + --max-new = {longest} exceeds the model's context of "
                         f"{model.config.max_position_embeddings} tokens; lower them")
    label = (f"model={name} device={device.type} hw={device_label(device).replace(' ', '_')} "
             f"dtype={str(dtype).removeprefix('torch.')} torch={torch.__version__}")
    return server_app(model, tokenizer, folders, name, config), label


def wait_for_empty_pool(url: str, api_key: str | None, timeout: float = 30.0) -> dict:
    """/health once nothing is running, waiting or live (releases are asynchronous: a moment after the clients)."""
    deadline = time.monotonic() + timeout
    while True:
        h = request_json(url, "GET", "/health", api_key=api_key)
        if (h["requests"] == h["running"] == h["waiting"] == 0) or time.monotonic() > deadline:
            return h
        time.sleep(0.05)


def offline(app, prompts: list[list[int]], new: list[int], device) -> tuple[dict, list[list[int]]]:
    """The same prompts and lengths submitted at once to the server's own engine (the server stopped)."""
    engine = app.state.loop.engine
    engine.reset_prefix_cache()  # no prompt of this run finds the served run's blocks
    engine.stats = EngineStats()
    params = [SamplingParams(temperature=0.0, max_new_tokens=n, ignore_eos=True) for n in new]
    done: dict = {}

    def run() -> None:
        try:
            sync(device)
            t0 = time.perf_counter()
            done["outputs"] = [o.completions[0] for o in engine.generate(prompts, params)]
            sync(device)
            done["seconds"] = time.perf_counter() - t0
        except BaseException as e:  # raised again on the calling thread
            done["error"] = e

    # On a thread of its own, as the server's engine loop runs: on a busy CPU, PyTorch's intra-op threads
    # started from the main thread ran a tiny model's step 20-40x slower than from another thread (measured
    # here, load average 9 on 2 cores), which would make the comparison about threads, not serving.
    worker = threading.Thread(target=run, name="offline-engine")
    worker.start()
    worker.join()
    if "error" in done:
        raise done["error"]
    outputs, seconds = done["outputs"], done["seconds"]
    tokens = sum(map(len, outputs))
    return dict(seconds=seconds, output_tokens=tokens, tok_per_s=tokens / seconds, steps=engine.stats.steps), outputs


def warm_up(app, vocab: int) -> None:
    """A few requests straight through the engine before any timing (kernels, allocator), then forgotten."""
    engine = app.state.loop.engine
    engine.generate(make_prompts(2, 8, 16, vocab, seed=123), SamplingParams(temperature=0.0, max_new_tokens=4,
                                                                           ignore_eos=True))
    engine.reset_prefix_cache()


@command_line
def main(argv=None) -> dict:
    args = parse_args(argv)
    app, label, server = None, f"url={args.url}", None
    if not args.url:
        app, label = build_app(args)
        vocab = args.vocab_size or app.state.loop.engine.model.config.vocab_size
        warm_up(app, vocab)
        server = ServerThread(app).start()
    else:
        vocab = args.vocab_size
    url = args.url or server.url
    prompts, new = workload(args, vocab)
    where = (f"{label} clients={args.clients} requests={args.requests} prompt={args.min_prompt}-{args.max_prompt} "
             f"new={args.min_new}-{args.max_new} disconnect_fraction={args.disconnect_fraction}")
    try:
        outcomes, seconds = run_clients(url, prompts, new, args.clients, args.disconnect_fraction, args.seed,
                                        args.api_key)
        pool = wait_for_empty_pool(url, args.api_key)
    finally:
        if server:
            server.stop()
    problems = audit(outcomes)
    served = {**summary(outcomes, seconds), **problems, "pool": pool}
    empty = pool["used_blocks"] == 0 and pool["free_blocks"] == pool["total_blocks"]
    print(f"bench mode=served {where} answered={served['answered']} dropped={served['dropped']} "
          f"lost={len(problems['lost'])} duplicated={len(problems['duplicated'])} "
          f"pool_free={pool['free_blocks']}/{pool['total_blocks']} seconds={seconds:.2f} "
          f"req_per_s={served['req_per_s']:.2f} ttft_p50_ms={served['ttft_p50_ms']:.1f} "
          f"ttft_p99_ms={served['ttft_p99_ms']:.1f} tok_per_s={served['tok_per_s']:.1f}", flush=True)
    for line in (problems["lost"] + problems["duplicated"])[:5]:
        print(f"  problem: {line}")
    result = {"served": served, "pool_empty": empty}
    if app is not None and not args.no_offline and args.disconnect_fraction == 0:
        result["offline"], outputs = offline(app, prompts, new, app.state.loop.engine.device)
        codec_hidden = app.state.codec.completion_hidden
        decode = app.state.codec.decode
        same = sum(o.text == decode([t for t in out if t not in codec_hidden]) for o, out in zip(outcomes, outputs))
        result["same_text"] = same
        off = result["offline"]
        print(f"bench mode=offline {where} seconds={off['seconds']:.2f} tok_per_s={off['tok_per_s']:.1f} "
              f"steps={off['steps']} same_text_as_served={same}/{len(outputs)}", flush=True)
        print(f"bench served_vs_offline {where} tok_per_s_ratio={served['tok_per_s'] / off['tok_per_s']:.3f}", flush=True)
    if problems["lost"] or problems["duplicated"] or not empty:
        raise UserRuntimeError(f"the server lost {len(problems['lost'])} and duplicated {len(problems['duplicated'])} "
                               f"requests; pool {pool['free_blocks']}/{pool['total_blocks']} blocks free at the end")
    return result


if __name__ == "__main__":
    main()
