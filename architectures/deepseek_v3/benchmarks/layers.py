"""Benchmark DeepSeek-V3's two signature layers, each beside its baseline in the same process.

    python -m architectures.deepseek_v3.benchmarks.layers                      # GPU: both parts, bf16, default sizes
    python -m architectures.deepseek_v3.benchmarks.layers --part decode --batch 32 --context 8192 --steps 50 --rounds 3
    python -m architectures.deepseek_v3.benchmarks.layers --part moe --tokens 16384
    python -m architectures.deepseek_v3.benchmarks.layers --device cpu         # CPU: tiny shapes, fp32, seconds

decode  Greedy decode steps (one token per sequence) at a long context, over a latent cache (`NaiveKVCache`
        of context + steps slots). Model: DeepSeek-V2-Lite's attention and widths (hidden 2048, 16
        heads, d_c 512, d_r 64, d_n 128, d_v 128, no q-LoRA, vocab 102400, its YaRN), cut to --layers layers
        with DENSE SwiGLU feed-forwards (V2-Lite's dense width 10944), so the weights stay ~1.5 GB. The cache
        is filled with N(0, 1) latents (the scale of the RMS-normed c_kv) instead of a prefill: attention
        costs the same whatever the values, and it is much faster to set up. Two forms read that same cache:
          absorbed   `attend_absorbed`: W_UK folded into the query, attention over the cached latent rows
          explicit   the baseline: `attend_explicit` over the cache, decompressing every cached latent into
                     per-head K/V (kv_b_proj) at every step
        Both forms' next-token logits are compared first; then, after an untimed round, the forms take turns,
        --rounds blocks of --steps steps each from the same context (median). Eager PyTorch, no CUDA graphs;
        each step reads the ids' range on the host (the model's input check), as the zoo's generate does.
moe     One DeepSeekMoE layer, forward + backward (V2-Lite's 64 routed experts of width 1408, top-6, 2 shared;
        DeepSeek-V3's sigmoid routing limited to 4 of 8 groups): ours (`DeepseekMoE`) vs transformers'
        `DeepseekV3MoE` with the same weights, with its experts_implementation grouped_mm and eager. Outputs
        and input gradients are compared first; the implementations take turns within each timed iteration.
        --compile adds torch.compile of ours and of transformers' grouped_mm block, as `--compile` training runs.
Every measurement is one line `bench part=... key=value ...`; `vs_X` is X's time over this line's time.
"""

from __future__ import annotations

import statistics
import time

import torch

from architectures.common.cache import bytes_per_token
from architectures.utils.command_line import ArgumentParser, UserRuntimeError, command_line
from architectures.deepseek_v3.config import DeepseekV3Config
from architectures.deepseek_v3.model import DeepseekV3
from architectures.deepseek_v3.moe import DeepseekMoE
from inference.kv_cache import NaiveKVCache
from architectures.utils.device import add_device_option, add_dtype_option, compute_dtype, resolve_device
from architectures.utils.timing import time_round_robin

# deepseek-ai/DeepSeek-V2-Lite config.json, except the routing: V2-Lite routes by softmax over all 64
# experts, while this MoE computes DeepSeek-V3's rule, here with V3's 8 groups, top-4 groups.
V2_LITE = dict(vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
               num_attention_heads=16, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
               v_head_dim=128, n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, n_group=8, topk_group=4,
               routed_scaling_factor=2.5, max_position_embeddings=163840,
               rope_scaling={"factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32,
                             "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707})
TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_attention_heads=4,
            kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
            n_shared_experts=2, num_experts_per_tok=2, n_group=4, topk_group=2, routed_scaling_factor=2.5)
SHAPES = {"v2-lite": V2_LITE, "tiny": TINY}
DEFAULTS = {"v2-lite": dict(layers=4, batch=32, context=8192, steps=50, rounds=3, tokens=16384, warmup=5, iters=20),
            "tiny": dict(layers=2, batch=2, context=64, steps=3, rounds=1, tokens=256, warmup=1, iters=2)}
# Agreement required before timing, relative to the reference's scale: bf16 keeps 8 bits of mantissa
# (~4e-3 per rounding), and the two forms round at different places; fp32 differs by summation order only.
TOLERANCE = {torch.bfloat16: 3e-2, torch.float32: 1e-4}


def line(**fields) -> str:
    return "bench " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- decode: absorbed vs explicit attention over one latent cache ------------------------------------


def set_attention_form(model: DeepseekV3, form: str) -> None:
    """absorbed: decode steps attend with `attend_absorbed`, as the model does. explicit: the same call
    decompresses per-head K/V from the cached latents with `attend_explicit` (an instance override)."""
    for layer in model.model.layers:
        mla = layer.self_attn
        mla.__dict__.pop("attend_absorbed", None)
        if form == "explicit":
            mla.attend_absorbed = lambda q_nope, q_rope, lat, view, m=mla: m.attend_explicit(
                q_nope, q_rope, lat[..., :m.d_c], lat[..., m.d_c:], view)


def decode_step(model, cache, token):
    """One token per sequence through the model and the cache: (B, 1) ids -> (B, V) next-token logits."""
    return model.compute_logits(model.hidden_states(token, cache)[:, -1])


def time_decode(model, cache, token, context: int, steps: int, device) -> float:
    """Seconds per greedy decode step, from the same cached context every time (the cache is rewound)."""
    cache.length = context
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        token = decode_step(model, cache, token).argmax(-1, keepdim=True)  # the next step's input
    sync(device)
    return (time.perf_counter() - start) / steps


@torch.no_grad()
def bench_decode(args, shape, device, dtype, where) -> list[dict]:
    L, B, context = args.layers, args.batch, args.context
    capacity = context + args.steps
    base = SHAPES[shape]
    cfg = DeepseekV3Config(**{**base, "num_hidden_layers": L, "first_k_dense_replace": L,  # dense FFNs only
                              "max_position_embeddings": max(base.get("max_position_embeddings", 0), capacity)})
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the GPU: ~0.7 B random weights take seconds on a CPU
        model = DeepseekV3(cfg)
    model = model.to(dtype).eval()
    cache = NaiveKVCache.for_model(model, B, capacity)
    for layer in cache.tokens:  # slots 0 .. context-1 of every layer: random latents instead of a prefill
        layer["latent"][:, :context].normal_()
    size = torch.finfo(dtype).bits // 8
    latent_bytes = bytes_per_token(model.cache_specs(), size)  # L x (d_c + d_r) x bytes
    per_head_bytes = bytes_per_token([cfg.decompressed_kv_spec()] * L, size)  # what MLA's latent stands for
    common = dict(device=where, dtype=args.dtype_name, shape=shape, layers=L, ffn="dense", batch=B, context=context)

    token = torch.randint(cfg.vocab_size, (B, 1), device=device)
    logits = {}
    for form in ("absorbed", "explicit"):
        set_attention_form(model, form)
        cache.length = context  # rewind: both forms read the same cached context and write the same slot
        logits[form] = decode_step(model, cache, token).float()
    diff = (logits["absorbed"] - logits["explicit"]).abs().max().item()
    scale = logits["explicit"].abs().max().item()
    tol = TOLERANCE[dtype] * max(scale, 1.0)
    print(line(part="decode", check="next_token_logits", form="absorbed", baseline="explicit", max_abs_diff=diff,
               max_abs_logit=scale, tol=tol, agree=diff <= tol, **common), flush=True)
    if not diff <= tol:
        raise RuntimeError(f"absorbed and explicit attention disagree by {diff:.3g} > {tol:.3g}: a bug in one form")
    print(line(part="decode", what="kv_bytes_per_token", latent=latent_bytes, per_head_kv=per_head_bytes,
               ratio=per_head_bytes / latent_bytes, layers=L, bytes_per_number=size), flush=True)

    # A first, untimed round visits the cache lengths the timed rounds will (cuDNN's attention builds a plan
    # per key length: on an H100 a cold round of the explicit form ran 2-3x slower). Then the forms take turns,
    # a block of steps each, so that a clock or load change hits both alike; the median is reported.
    times = {"explicit": [], "absorbed": []}
    for _ in range(1 + args.rounds):
        for form in times:
            set_attention_form(model, form)
            times[form].append(time_decode(model, cache, token, context, args.steps, device))
    set_attention_form(model, "absorbed")
    seconds = {form: statistics.median(t[1:]) for form, t in times.items()}

    results = []
    for form, baseline in (("absorbed", "explicit"), ("explicit", "absorbed")):
        s = seconds[form]
        extra = {"decompressed_kv_bytes_per_token": per_head_bytes} if form == "explicit" else {}
        r = dict(part="decode", form=form, baseline=baseline, **common, steps=args.steps, rounds=args.rounds,
                 ms_per_step=s * 1e3, tokens_per_s=B / s, kv_bytes_per_token=latent_bytes, **extra,
                 **{f"vs_{baseline}": seconds[baseline] / s})
        print(line(**r), flush=True)
        results.append(r)
    return results


# ---- moe: our DeepSeekMoE vs transformers' DeepseekV3MoE on the same weights --------------------------


def transformers_moe(cfg: DeepseekV3Config, implementation: str, device):
    """transformers is the test oracle (the test extra), not a dependency of the zoo."""
    try:
        import transformers
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
    except ImportError as e:
        raise UserRuntimeError(f'the moe part compares against transformers ({e}), which comes with the test '
                               f'extra: pip install -e ".[test]"; or pass --part decode') from e
    hf_cfg = transformers.DeepseekV3Config(
        hidden_size=cfg.hidden_size, moe_intermediate_size=cfg.moe_intermediate_size,
        n_routed_experts=cfg.n_routed_experts, n_shared_experts=cfg.n_shared_experts,
        num_experts_per_tok=cfg.num_experts_per_tok, n_group=cfg.n_group, topk_group=cfg.topk_group,
        norm_topk_prob=cfg.norm_topk_prob, routed_scaling_factor=cfg.routed_scaling_factor)
    hf_cfg._experts_implementation = implementation  # read at every call: one config per block
    with torch.device(device):
        return DeepseekV3MoE(hf_cfg)


def bench_moe(args, shape, device, dtype, where) -> list[dict]:
    cfg = DeepseekV3Config(**SHAPES[shape])
    D, E = cfg.hidden_size, cfg.n_routed_experts
    torch.manual_seed(0)
    with torch.device(device):
        ours = DeepseekMoE(cfg, layer_idx=0)
        with torch.no_grad():
            ours.gate.weight.normal_(std=D ** -0.5)  # router logits of order 1: near-balanced routing
            # A balancing bias as after training, rounded to bf16 so that transformers' bf16 copy is the same.
            ours.gate.e_score_correction_bias.copy_((0.1 * torch.randn(E)).to(torch.bfloat16).float())
            for p in (ours.experts.gate_up_proj, ours.experts.down_proj, *ours.shared_experts.parameters()):
                p.normal_(std=0.02)
    impls = {"ours": ours.to(dtype)}
    for name in ("grouped_mm", "eager"):
        block = transformers_moe(cfg, name, device).to(dtype)
        block.load_state_dict(ours.state_dict())  # transformers' names and layout are ours
        impls[f"hf_{name}"] = block
    if args.compile:  # each compiled as a training step with --compile would run it
        impls["ours_compiled"] = torch.compile(ours)
        impls["hf_grouped_mm_compiled"] = torch.compile(impls["hf_grouped_mm"])

    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(1, args.tokens, D, generator=g).to(device, dtype).requires_grad_()
    grad = torch.randn(1, args.tokens, D, generator=g).to(device, dtype)
    got = {}
    for name, fn in impls.items():  # the same function, or the timing compares different work
        x.grad = None
        out = fn(x)
        out.backward(grad)
        got[name] = (out.detach().float(), x.grad.float())
    common = dict(device=where, dtype=args.dtype_name, shape=shape, tokens=args.tokens, hidden=D,
                  moe_ffn=cfg.moe_intermediate_size, experts=E, top_k=cfg.num_experts_per_tok,
                  shared=cfg.n_shared_experts, groups=cfg.n_group, topk_groups=cfg.topk_group)
    for name in [n for n in impls if n != "ours"]:
        errs = [((a - b).norm() / b.norm()).item() for a, b in zip(got["ours"], got[name])]
        ok = max(errs) <= TOLERANCE[dtype]
        print(line(part="moe", check="output_and_input_grad", impl="ours", baseline=name, out_rel_err=errs[0],
                   grad_rel_err=errs[1], tol=TOLERANCE[dtype], agree=ok, **common), flush=True)
        if not ok:
            raise RuntimeError(f"our DeepSeekMoE and transformers' ({name}) disagree: relative errors {errs}")

    params = list({id(p): p for fn in impls.values() for p in fn.parameters()}.values())
    times = time_round_robin(impls, x, grad, params, args.warmup, args.iters, device)
    ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    results = []
    for name in impls:
        others = [o for o in impls if o != name]
        r = dict(part="moe", impl=name, baseline=",".join(others), **common, step="fwd+bwd", iters=args.iters,
                 ms=ms[name], tokens_per_s=args.tokens / ms[name] * 1e3,
                 **{f"vs_{o}": ms[o] / ms[name] for o in others})
        print(line(**r), flush=True)
        results.append(r)
    return results


@command_line
def main(argv=None) -> list[dict]:
    p = ArgumentParser(prog="python -m architectures.deepseek_v3.benchmarks.layers", description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=("decode", "moe", "all"), default="all", help="which benchmark to run")
    add_device_option(p)
    add_dtype_option(p, help="auto: bf16 on a GPU, fp32 on a CPU")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (a CPU always uses them): seconds, for tests")
    p.add_argument("--compile", action="store_true",
                   help="moe: also time torch.compile of ours and of transformers' grouped_mm block")
    for flag, what in (("layers", "decode: model layers"), ("batch", "decode: sequences"),
                       ("context", "decode: cached tokens per sequence"), ("steps", "decode: timed steps per round"),
                       ("rounds", "decode: rounds of steps per form, whose median is reported"),
                       ("tokens", "moe: tokens per forward"), ("warmup", "moe: untimed iterations first"),
                       ("iters", "moe: timed iterations, whose median is reported")):
        p.add_argument(f"--{flag}", type=int, default=None, help=f"{what}; None: {DEFAULTS['v2-lite'][flag]} "
                                                                  f"(tiny: {DEFAULTS['tiny'][flag]})")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    shape = "tiny" if args.tiny or device.type == "cpu" else "v2-lite"
    for key, value in DEFAULTS[shape].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
        least = 0 if key == "warmup" else 1
        if getattr(args, key) < least:
            raise ValueError(f"--{key} must be >= {least}, got {getattr(args, key)}")
    dtype = compute_dtype(args.dtype, device)
    args.dtype_name = "bf16" if dtype == torch.bfloat16 else "fp32"
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"cpu-{torch.get_num_threads()}threads").replace(" ", "_")
    results = []
    if args.part in ("decode", "all"):
        results += bench_decode(args, shape, device, dtype, where)
    if args.part in ("moe", "all"):
        results += bench_moe(args, shape, device, dtype, where)
    return results


if __name__ == "__main__":
    main()
