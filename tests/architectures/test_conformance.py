"""Every architecture of the zoo is the same function as its transformers reference, and loads,
saves and refuses checkpoints the same way. One row per architecture; every test runs over
every row, so a new family joins all of them by adding its row to ROWS.

A row builds tiny random transformers models of its family (one per named variant: GQA ratios,
RoPE scaling, expert counts, ...), saves them with `save_pretrained` (the hub layout) and loads
them with `architectures.registry.package(family).from_pretrained`. The checks:
1. logits equal transformers' in fp32 within the row's tolerance (1e-4: both compute the same
   ops, up to summation order and SDPA kernels; a wrong weight, norm or rotation shows at 1e-2
   or more);
2. greedy generation equals transformers' `generate`, token for token, with our KV cache on and off;
3. our `save_pretrained` writes a directory transformers loads into the same function, and that
   we load back to the same config;
4. sharded checkpoints (`model.safetensors.index.json`) load; bf16 loads close to fp32;
5. bad checkpoints fail with an error that says what is wrong: a missing tensor, a tensor of the
   wrong shape, a config.json with a layer more or less than the weights, a truncated or
   corrupted safetensors file, a missing shard, a config.json of another family (the error
   names the package that loads it, from the registry), a missing or unreadable config.json.
What only one family has (Mixtral's router logits and fused layout, Llama's RoPE type errors)
stays in tests/architectures/<family>/.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

# The oracle is imported, never skipped: without it these tests must fail, not pass vacuously.
import transformers

from architectures import registry
from inference.sampling import generate
from inference.sampling import SamplingParams

PROMPT = [5, 17, 42, 8, 3, 77]


@dataclass(frozen=True)
class Row:
    family: str  # the name in architectures.registry
    # make_reference(path, **variant, **save_kwargs): a tiny random transformers model of the family,
    # saved with save_pretrained(path, **save_kwargs), returned in eval mode
    make_reference: Callable[..., transformers.PreTrainedModel]
    variants: dict[str, dict]  # the reference configs the logits test covers, by name; the first is the default
    generation_variants: tuple[str, ...]  # the variants whose greedy generations are compared
    make_ours: Callable[[], torch.nn.Module]  # a tiny random model of ours, for the save -> transformers direction
    tolerance: float = 1e-4  # on fp32 logits, relative and absolute
    seq_len: int = 100  # tokens per row of the logits test
    new_tokens: int = 40  # greedy tokens generated
    layers_prefix: str = "model.layers"  # the checkpoint's name of layer i is f"{layers_prefix}.{i}."
    # config.json fields besides num_hidden_layers that say how many layers there are (Gemma's
    # layer_types): resize_layers(config, n) -> those fields for n layers, the layers' pattern kept
    resize_layers: Callable[[dict, int], dict] = lambda config, n: {}

    @property
    def package(self):
        return registry.package(self.family)

    @property
    def model_type(self) -> str:
        return registry.family(self.family).model_types[0]

    def reference(self, path: Path, variant: str | None = None, **save_kwargs):
        return self.make_reference(path, **self.variants[variant or next(iter(self.variants))], **save_kwargs)


def perturb_norms(ref: torch.nn.Module) -> None:
    """Random init leaves the norms at 1; perturb them so a swapped or ignored norm would show."""
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))


# ---- Llama 3 ----------------------------------------------------------------------------------

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}


def llama_reference(path, gqa_ratio=2, rope_scaling=None, tie=False, seed=0, **save_kwargs):
    torch.manual_seed(seed)
    heads = 4
    cfg = transformers.LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=heads,
        num_key_value_heads=heads // gqa_ratio, max_position_embeddings=128, rms_norm_eps=1e-5,
        rope_theta=10000.0, rope_scaling=dict(rope_scaling) if rope_scaling else None, tie_word_embeddings=tie,
    )  # a copy: transformers writes rope_theta into the dict it is given
    ref = transformers.LlamaForCausalLM(cfg).eval()
    perturb_norms(ref)
    ref.save_pretrained(path, **save_kwargs)
    return ref


def llama_ours():
    from architectures.llama3 import Llama3, LlamaConfig

    torch.manual_seed(0)
    return Llama3(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                              rope_scaling={k: v for k, v in LLAMA3_ROPE.items() if k != "rope_type"},
                              tie_word_embeddings=True)).eval()


# GQA ratios 1, 2, 4 (MHA, GQA, MQA-like), with and without Llama 3.1 RoPE scaling, tied and untied.
LLAMA_VARIANTS = {
    f"gqa{g}-{'llama3rope' if r else 'rope'}-{'tied' if t else 'untied'}": dict(gqa_ratio=g, rope_scaling=r, tie=t)
    for g, r, t in itertools.product([2, 1, 4], [None, LLAMA3_ROPE], [False, True])
}


# ---- Mixtral ----------------------------------------------------------------------------------

def mixtral_reference(path, experts=8, top_k=2, seed=0, **save_kwargs):
    torch.manual_seed(seed)
    cfg = transformers.MixtralConfig(
        vocab_size=97, hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, num_local_experts=experts, num_experts_per_tok=top_k,
        rope_theta=10000.0,
    )
    ref = transformers.MixtralForCausalLM(cfg).eval()
    perturb_norms(ref)
    # A random router is near uniform; scaled up, its routing is decisive and differs per token.
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.mul_(20)
    ref.save_pretrained(path, **save_kwargs)
    return ref


def mixtral_ours():
    from architectures.mixtral import Mixtral, MixtralConfig

    torch.manual_seed(0)
    ours = Mixtral(MixtralConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                 num_local_experts=4, num_experts_per_tok=2)).eval()
    with torch.no_grad():
        for layer in ours.model.layers:
            layer.mlp.gate.weight.mul_(20)
    return ours


MIXTRAL_VARIANTS = {f"{e}experts-top{k}": dict(experts=e, top_k=k) for e, k in [(8, 2), (4, 1), (4, 2), (8, 1)]}


DEEPSEEK_YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32,
                 "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 1.0}


def deepseek_reference(path, q_lora_rank=None, rope_scaling=None, n_shared_experts=1, n_group=2, topk_group=1,
                       first_k_dense_replace=1, seed=0, **save_kwargs):
    torch.manual_seed(seed)
    cfg = transformers.DeepseekV3Config(
        vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=q_lora_rank, kv_lora_rank=24, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8, num_experts_per_tok=2, n_group=n_group,
        topk_group=topk_group, n_shared_experts=n_shared_experts, first_k_dense_replace=first_k_dense_replace,
        routed_scaling_factor=2.5, max_position_embeddings=128, bos_token_id=None, eos_token_id=None,
        # transformers writes rope_theta and rope_type into the dict it is given: pass a copy
        rope_scaling=dict(rope_scaling) if rope_scaling else None)
    ref = transformers.DeepseekV3ForCausalLM(cfg).eval()
    perturb_norms(ref)
    with torch.no_grad():  # decisive routers and nonzero balancing biases, so a routing slip shows
        for name, p in ref.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 1.0)
        for name, b in ref.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.3 * torch.randn_like(b))
    ref.save_pretrained(path, **save_kwargs)
    return ref


def deepseek_ours():
    from architectures.deepseek_v3 import DeepseekV3, DeepseekV3Config

    torch.manual_seed(0)
    return DeepseekV3(DeepseekV3Config(
        vocab_size=50, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
        n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1, max_position_embeddings=64,
        rope_scaling={k: v for k, v in DEEPSEEK_YARN.items() if k != "type"})).eval()


DEEPSEEK_VARIANTS = {
    "mla-2groups": dict(),
    "qlora-yarn-2shared-4groups-nodense": dict(q_lora_rank=16, rope_scaling=DEEPSEEK_YARN, n_shared_experts=2,
                                               n_group=4, topk_group=2, first_k_dense_replace=0),
}


# ---- Mamba-2 and Nemotron-H --------------------------------------------------------------------

def mamba2_reference(path, kind="mamba2", n_groups=1, chunk_size=8, pattern="MM", tie=False, seed=0, **save_kwargs):
    """A pure transformers Mamba2ForCausalLM (kind "mamba2"), or a NemotronHForCausalLM built from
    `pattern` (M Mamba-2, * attention, - MLP, E MoE). Sequences of 100 tokens are not a multiple of
    any chunk size used, so the chunked SSD's padded tail is covered."""
    torch.manual_seed(seed)
    common = dict(vocab_size=97, hidden_size=64, n_groups=n_groups, chunk_size=chunk_size, conv_kernel=4,
                  tie_word_embeddings=tie, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if kind == "mamba2":
        cfg = transformers.Mamba2Config(num_heads=8, head_dim=16, state_size=16, expand=2,
                                        num_hidden_layers=len(pattern), **common)
        ref = transformers.Mamba2ForCausalLM(cfg).eval()
    else:
        names = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}
        cfg = transformers.NemotronHConfig(
            layers_block_type=[names[c] for c in pattern], mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=16,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=96, n_routed_experts=4,
            num_experts_per_tok=2, moe_intermediate_size=32, moe_shared_expert_intermediate_size=48,
            max_position_embeddings=128, use_mamba_kernels=False, initializer_range=0.1, **common)
        ref = transformers.NemotronHForCausalLM(cfg).eval()
    perturb_norms(ref)
    with torch.no_grad():  # decisive routers, so that no token sits on a routing tie
        for name, p in ref.named_parameters():
            if name.endswith("gate.weight"):
                p.normal_(0.0, 1.0)
    ref.save_pretrained(path, **save_kwargs)
    return ref


def mamba2_ours():
    """A pure Mamba-2 (the row's first model_type); tests/architectures/mamba2_hybrid/ saves hybrids."""
    from architectures.mamba2_hybrid import Mamba2Hybrid, Mamba2HybridConfig

    torch.manual_seed(0)
    return Mamba2Hybrid(Mamba2HybridConfig(
        model_type="mamba2", vocab_size=50, hidden_size=32, num_hidden_layers=3, hybrid_override_pattern="MMM",
        mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=8, n_groups=2, chunk_size=8, gated_norm_per_group=False,
        tie_word_embeddings=True, max_position_embeddings=64, initializer_range=0.1)).eval()


# The first (default) variant is a pure Mamba2: its config.json's num_hidden_layers is the layer count
# (NemotronH's comes from its pattern). n_groups 1 and 2, chunk sizes 8, 16 and 32, four layer patterns.
MAMBA2_VARIANTS = {
    "mamba2-1group-chunk8": dict(),
    "mamba2-2groups-chunk16-tied": dict(n_groups=2, chunk_size=16, tie=True),
    "nemotronh-M*-EM-2groups-chunk8": dict(kind="nemotron_h", n_groups=2, pattern="M*-EM"),
    "nemotronh-M-M*-1group-chunk32": dict(kind="nemotron_h", chunk_size=32, pattern="M-M*"),
    # (transformers' NemotronH needs an attention layer: without one its forward fails on its own cache)
    "nemotronh-EM*M-2groups-chunk16": dict(kind="nemotron_h", n_groups=2, chunk_size=16, pattern="EM*M"),
}


# ---- Gemma 2 and Gemma 3 -----------------------------------------------------------------------

def gemma_reference(path, kind="gemma3", layers=6, window=8, pattern=None, attn_softcap=None, final_softcap=None,
                    rope_scaling=None, tie=True, init=0.02, seed=0, **save_kwargs):
    """A tiny Gemma2ForCausalLM or Gemma3ForCausalLM. The 100-token rows are longer than every window, so
    the windows cut; with the caps, init 0.1 makes scores and logits large enough for small caps to bite.
    The eager attention is the oracle: it applies Gemma 2's soft-cap where SDPA cannot."""
    torch.manual_seed(seed)
    common = dict(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                  query_pre_attn_scalar=16, sliding_window=window, initializer_range=init, tie_word_embeddings=tie,
                  attn_logit_softcapping=attn_softcap, final_logit_softcapping=final_softcap,
                  bos_token_id=None, eos_token_id=None, pad_token_id=None, attn_implementation="eager")
    if pattern is not None:
        common["layer_types"] = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                                 for i in range(layers)]
    if kind == "gemma2":
        ref = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**common))
    else:
        rope = {"rope_scaling": dict(rope_scaling)} if rope_scaling else {}
        ref = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**common, **rope))
    ref.eval()
    perturb_norms(ref)
    ref.save_pretrained(path, **save_kwargs)
    return ref


def gemma_ours():
    from architectures.gemma import Gemma, GemmaConfig

    torch.manual_seed(0)
    return Gemma(GemmaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                             sliding_window=5, sliding_window_pattern=3, query_pre_attn_scalar=8,
                             final_logit_softcapping=2.0, rope_theta=1e6, rope_local_base_freq=1e4,
                             rope_scaling={"rope_type": "linear", "factor": 4.0},
                             initializer_range=0.1)).eval()


# Gemma 3 (QK-norm, two RoPE bases) and Gemma 2 (alternating layers, soft-caps): windows of 4 to 32
# tokens, layer patterns 5:1, 2:1 and 1:1, soft-caps on and off, linear RoPE scaling, tied and untied.
GEMMA_VARIANTS = {
    "gemma3-window8-5to1": dict(),
    "gemma3-window4-2to1-finalcap-linearrope": dict(window=4, pattern=3, final_softcap=3.0, init=0.1,
                                                    rope_scaling={"rope_type": "linear", "factor": 8.0}),
    "gemma3-window32-1to1-untied": dict(window=32, layers=4, pattern=2, tie=False),
    "gemma2-window8-softcaps": dict(kind="gemma2", layers=4, attn_softcap=2.0, final_softcap=3.0, init=0.1),
    "gemma2-window16-nocaps": dict(kind="gemma2", layers=4, window=16),
}


def gemma_layer_types(config: dict, n: int) -> dict:
    """n layer types continuing the checkpoint's own pattern."""
    types = config["layer_types"]
    return {"layer_types": [types[i % len(types)] for i in range(n)]}


ROWS = [
    Row("llama3", llama_reference, LLAMA_VARIANTS, ("gqa1-rope-untied", "gqa4-llama3rope-untied"), llama_ours),
    Row("mixtral", mixtral_reference, MIXTRAL_VARIANTS, ("4experts-top1", "8experts-top2"), mixtral_ours),
    Row("deepseek_v3", deepseek_reference, DEEPSEEK_VARIANTS, ("qlora-yarn-2shared-4groups-nodense",), deepseek_ours),
    Row("mamba2_hybrid", mamba2_reference, MAMBA2_VARIANTS,
        ("mamba2-2groups-chunk16-tied", "nemotronh-M*-EM-2groups-chunk8"), mamba2_ours, new_tokens=30, layers_prefix="backbone.layers"),
    Row("gemma", gemma_reference, GEMMA_VARIANTS, ("gemma3-window8-5to1", "gemma2-window8-softcaps"), gemma_ours,
        resize_layers=gemma_layer_types),
]

LOGITS_CASES = [(row, v) for row in ROWS for v in row.variants]
GENERATION_CASES = [(row, v) for row in ROWS for v in row.generation_variants]
by_row = pytest.mark.parametrize("row", ROWS, ids=[r.family for r in ROWS])


def test_every_registered_family_has_a_row():
    """Every causal-LM family has a row here; a family of another kind is held to its reference in its own
    folder's test_parity.py (Stable Diffusion against diffusers), since logits and greedy tokens are an LM's."""
    others = [n for n in registry.FAMILIES if n not in registry.language_models()]
    assert all((Path(__file__).parent / n / "test_parity.py").is_file() for n in others), others
    missing = sorted(set(registry.language_models()) - {r.family for r in ROWS})
    assert not missing, (f"registered famil{'ies' if len(missing) > 1 else 'y'} {missing} without a row in ROWS: "
                         f"add one (a transformers reference builder, its variants, a builder of our model)")
    assert len(ROWS) == len({r.family for r in ROWS}) and all(r.family in registry.FAMILIES for r in ROWS)


# ---- 1. logits --------------------------------------------------------------------------------

@pytest.mark.parametrize("row,variant", LOGITS_CASES, ids=[f"{r.family}-{v}" for r, v in LOGITS_CASES])
def test_logits_match_transformers(tmp_path, row, variant):
    ref = row.reference(tmp_path, variant)
    ours = row.package.from_pretrained(tmp_path)
    V = ref.config.vocab_size
    ids = torch.randint(0, V, (3, row.seq_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids).logits
        got = ours(ids)
    assert got.shape == (3, row.seq_len, V)
    torch.testing.assert_close(got, expected, rtol=row.tolerance, atol=row.tolerance)
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == ref.config.tie_word_embeddings


# ---- 2. greedy generation, cache on and off ---------------------------------------------------

@pytest.mark.parametrize("row,variant", GENERATION_CASES, ids=[f"{r.family}-{v}" for r, v in GENERATION_CASES])
def test_greedy_generation_matches_transformers_with_and_without_cache(tmp_path, row, variant):
    ref = row.reference(tmp_path, variant)
    ours = row.package.from_pretrained(tmp_path)
    n = row.new_tokens
    expected = ref.generate(torch.tensor([PROMPT]), max_new_tokens=n, do_sample=False, min_new_tokens=n,
                            pad_token_id=0)[0, len(PROMPT):].tolist()
    greedy = SamplingParams(temperature=0.0, max_new_tokens=n)
    assert generate(ours, PROMPT, greedy, use_cache=True) == expected
    assert generate(ours, PROMPT, greedy, use_cache=False) == expected


# ---- 3. our checkpoints load in transformers --------------------------------------------------

@by_row
def test_our_checkpoint_loads_in_transformers(tmp_path, row):
    """The converse direction: what our train scripts write is a valid directory of the family's
    transformers class, and loads back (through the registry's dispatch) to the same config."""
    ours = row.make_ours()
    row.package.save_pretrained(ours, tmp_path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert ref.config.model_type == row.model_type
    ids = torch.randint(0, ours.config.vocab_size, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, rtol=row.tolerance, atol=row.tolerance)
    again = registry.from_pretrained(tmp_path)
    assert type(again) is registry.model_class(row.family)
    assert again.config == ours.config


# ---- 4. sharded checkpoints, bf16 -------------------------------------------------------------

@by_row
def test_sharded_checkpoint_loads(tmp_path, row):
    ref = row.reference(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    ours = row.package.from_pretrained(tmp_path)
    ids = torch.randint(0, ref.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, rtol=row.tolerance, atol=row.tolerance)


@by_row
def test_bf16_load_is_close_to_fp32(tmp_path, row):
    row.reference(tmp_path)
    fp32, bf16 = row.package.from_pretrained(tmp_path), row.package.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    ids = torch.randint(0, fp32.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        # bf16 keeps 8 mantissa bits: logits of order 1 agree to a few hundredths (with a decisive
        # router, no token of a mixture of experts switches experts).
        torch.testing.assert_close(bf16(ids).float(), fp32(ids), rtol=0.05, atol=0.05)


# ---- 5. bad checkpoints -----------------------------------------------------------------------

def edit_weights(directory: Path, edit) -> None:
    """Rewrite model.safetensors with edit(state) applied to its tensors."""
    f = directory / "model.safetensors"
    state = load_file(f)
    edit(state)
    save_file(state, f, metadata={"format": "pt"})


def last_layer_tensor(directory: Path, prefix: str = "model.layers") -> str:
    """A tensor of the last layer, named f"{prefix}.{i}." as the family's transformers class names it."""
    names = load_file(directory / "model.safetensors").keys()
    last = max(int(m[1]) for n in names if (m := re.match(rf"{re.escape(prefix)}\.(\d+)\.", n)))
    return sorted(n for n in names if n.startswith(f"{prefix}.{last}."))[-1]


@by_row
def test_missing_tensor_is_named(tmp_path, row):
    row.reference(tmp_path)
    name = last_layer_tensor(tmp_path, row.layers_prefix)
    edit_weights(tmp_path, lambda state: state.pop(name))
    with pytest.raises(ValueError, match=rf"missing.*\[{re.escape(repr(name))}\]"):
        row.package.from_pretrained(tmp_path)


@by_row
def test_tensor_of_the_wrong_shape_is_named_with_both_shapes(tmp_path, row):
    row.reference(tmp_path)
    name = last_layer_tensor(tmp_path, row.layers_prefix)
    shape = tuple(load_file(tmp_path / "model.safetensors")[name].shape)
    edit_weights(tmp_path, lambda state: state.update({name: state[name][:-1].clone()}))
    wrong = (shape[0] - 1, *shape[1:])
    with pytest.raises(ValueError, match=rf"shape mismatches.*{re.escape(f'{name}: checkpoint {wrong} vs model {shape}')}"):
        row.package.from_pretrained(tmp_path)


@by_row
def test_config_with_a_layer_more_or_less_than_the_weights_names_the_tensors(tmp_path, row, edit_config):
    ref = row.reference(tmp_path)
    L = ref.config.num_hidden_layers
    layers = re.escape(row.layers_prefix)
    config = json.loads((tmp_path / "config.json").read_text())
    edit_config(tmp_path, num_hidden_layers=L + 1, **row.resize_layers(config, L + 1))
    with pytest.raises(ValueError, match=rf"missing.*'{layers}\.{L}\."):
        row.package.from_pretrained(tmp_path)
    edit_config(tmp_path, num_hidden_layers=L - 1, **row.resize_layers(config, L - 1))
    with pytest.raises(ValueError, match=rf"unexpected tensors \[.*'{layers}\.{L - 1}\."):
        row.package.from_pretrained(tmp_path)


@by_row
def test_truncated_safetensors_is_reported(tmp_path, row):
    row.reference(tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        row.package.from_pretrained(tmp_path)


@by_row
def test_corrupted_safetensors_header_is_reported(tmp_path, row):
    row.reference(tmp_path)
    f = tmp_path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"not a header"
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="truncated or corrupted"):
        row.package.from_pretrained(tmp_path)


@by_row
def test_missing_shard_is_named(tmp_path, row):
    row.reference(tmp_path, max_shard_size="20KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        row.package.from_pretrained(tmp_path)


@by_row
def test_config_of_another_family_is_refused_and_the_registry_loads_it(tmp_path, row):
    for other in (r for r in ROWS if r.family != row.family):
        directory = tmp_path / other.family
        other.reference(directory)
        with pytest.raises(ValueError, match=rf"model_type='{other.model_type}'.*not a '{row.model_type}' model.*"
                                             r"architectures\.registry\.from_pretrained"):
            row.package.from_pretrained(directory)
        assert isinstance(registry.from_pretrained(directory), registry.model_class(other.family))
    # A model_type no family loads: the error lists what the zoo does load.
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"model_type='gpt2'.*architectures\.registry\.from_pretrained"):
        row.package.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=rf"model_type='gpt2'.*{re.escape(registry.family(row.family).package)}"):
        registry.from_pretrained(tmp_path)


@by_row
def test_missing_directory_config_or_weights_are_reported(tmp_path, row):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        row.package.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        row.package.from_pretrained(tmp_path)
    row.reference(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor model.safetensors.index.json"):
        row.package.from_pretrained(tmp_path)


@by_row
def test_config_json_missing_or_invalid_is_reported(tmp_path, row):
    row.reference(tmp_path)
    config = tmp_path / "config.json"
    text = config.read_text()
    config.unlink()
    with pytest.raises(FileNotFoundError, match=r"has no config.json.*model.safetensors"):
        row.package.from_pretrained(tmp_path)
    config.write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match="not valid JSON"):
        row.package.from_pretrained(tmp_path)
