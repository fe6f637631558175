"""Tiny random transformers references of the family (Mamba2ForCausalLM, NemotronHForCausalLM), saved
with their save_pretrained and loaded back with ours, and prompts of different lengths."""

import pytest
import torch
import transformers

from architectures.mamba2_hybrid import from_pretrained

NAMES = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}


def build_reference(path, pattern="M*-EM", n_groups=2, chunk_size=8, seed=0):
    """NemotronHForCausalLM for a hybrid pattern, Mamba2ForCausalLM for "MM..."; weights spread out
    (initializer_range 0.2, perturbed norms, decisive routers) so greedy argmaxes are far from ties."""
    torch.manual_seed(seed)
    common = dict(vocab_size=97, hidden_size=64, n_groups=n_groups, chunk_size=chunk_size, conv_kernel=4,
                  bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if set(pattern) == {"M"}:
        ref = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(
            num_heads=8, head_dim=16, state_size=16, expand=2, num_hidden_layers=len(pattern), initializer_range=0.2,
            **common)).eval()
    else:
        ref = transformers.NemotronHForCausalLM(transformers.NemotronHConfig(
            layers_block_type=[NAMES[c] for c in pattern], mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=16,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=96, n_routed_experts=4,
            num_experts_per_tok=2, moe_intermediate_size=32, moe_shared_expert_intermediate_size=48,
            max_position_embeddings=128, use_mamba_kernels=False, initializer_range=0.2, **common)).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            if name.endswith("gate.weight"):
                p.normal_(0.0, 1.0)
    ref.save_pretrained(path)
    return ref


@pytest.fixture
def reference(tmp_path):
    """reference(pattern=..., n_groups=..., chunk_size=...) -> (transformers model, our model loaded from its files)."""
    def make(**kw):
        directory = tmp_path / f"ref{len(list(tmp_path.iterdir()))}"
        ref = build_reference(directory, **kw)
        return ref, from_pretrained(directory)
    return make


@pytest.fixture
def prompts():
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(0, 97, (n,), generator=gen).tolist() for n in (5, 12, 1, 9)]


@pytest.fixture
def one_thread():
    """The smoke tests run on a CPU that other jobs share: with one thread they do not fight them
    for the cores (two threads on a busy 2-core machine run several times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
