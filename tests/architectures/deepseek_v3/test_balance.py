"""Balancing DeepSeekMoE's experts: the report's complementary sequence-wise balance loss
(DeepSeek-V3 Technical Report, arXiv:2412.19437, section 2.1.2, eqs. 17-20), and the
auxiliary-loss-free bias update under torch.distributed, where every rank must see the loads of
the whole global batch.

The loss is checked against a loop written from the equations, one sequence and one expert at a
time (exact up to fp32 summation order: 1e-6). The distributed tests start two processes on the
gloo backend: this file, run as a script, is their worker."""

import json
import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import transformers  # the oracle, a declared test dependency

from architectures.deepseek_v3 import DeepseekV3, DeepseekV3Config, update_routing_bias
from architectures.deepseek_v3.moe import Router, sequence_balance_loss, take_balance_losses
from architectures.deepseek_v3.losses import deepseek_lm_loss
from architectures.common.loss import lm_loss

REPO = Path(__file__).resolve().parents[3]


def small_config(**kw) -> DeepseekV3Config:
    # 1 dense layer then 2 MoE layers of 8 experts in 2 groups (top-2 from the best group).
    base = dict(vocab_size=40, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
                num_attention_heads=2, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, max_position_embeddings=32)
    return DeepseekV3Config(**{**base, **kw})


def small_model(seed: int = 0, **kw) -> DeepseekV3:
    torch.manual_seed(seed)
    model = DeepseekV3(small_config(**kw))
    with torch.no_grad():  # decisive routers, so that the loads are far from even
        for layer in model.model.layers[1:]:
            layer.mlp.gate.weight.normal_(0.0, 1.0)
    return model


def batch(B: int = 3, T: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, 40, (B, T + 1), generator=torch.Generator().manual_seed(seed))
    return tokens[:, :-1], tokens[:, 1:]


def loop_balance_loss(scores: torch.Tensor, idx: torch.Tensor) -> float:
    """The equations as written, for scores (B, T, E) and chosen experts (B, T, k): per sequence,
    sum over experts of f_i P_i; then the mean over sequences."""
    B, T, E = scores.shape
    k = idx.shape[-1]
    total = 0.0
    for b in range(B):
        for i in range(E):
            f_i = E / (k * T) * sum(1.0 for t in range(T) if i in idx[b, t].tolist())
            P_i = sum(float(scores[b, t, i] / scores[b, t].sum()) for t in range(T)) / T
            total += f_i * P_i
    return total / B


def test_balance_loss_equals_the_loop_over_sequences_and_experts():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(3, 7, 8, generator=g)  # (B, T, E): any positive affinities
    idx = (scores + torch.rand(3, 7, 8, generator=g)).topk(2, dim=-1).indices  # (B, T, 2), as if biased
    torch.testing.assert_close(sequence_balance_loss(scores, idx).item(), loop_balance_loss(scores, idx),
                               rtol=1e-6, atol=1e-6)
    # Balanced: every expert chosen equally often in every sequence, equal affinities -> exactly 1.
    even = torch.arange(8).view(4, 2).repeat(2, 1)[None]  # (1, 8, 2): tokens 0..3 and 4..7 cover all 8 experts
    assert sequence_balance_loss(torch.full((1, 8, 8), 0.3), even).item() == pytest.approx(1.0)


def test_the_model_adds_alpha_times_the_sum_over_layers_of_the_per_sequence_loss():
    """deepseek_lm_loss = cross-entropy + alpha * sum over MoE layers of the loop's value, each
    computed from the router's input as the test sees it (sigmoid(x e_i^T), sequence by sequence)."""
    model = small_model(seq_aux_loss_alpha=0.01).train()
    x, y = batch()
    seen = {}
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, args, out, i=i: seen.__setitem__(i, (args[0], out[1])))
             for i, layer in enumerate(model.model.layers) if i >= 1]
    loss, metrics = deepseek_lm_loss(model, (x, y))
    for h in hooks:
        h.remove()
    expected = []
    for i, (flat, idx) in sorted(seen.items()):
        scores = torch.sigmoid(flat.float() @ model.model.layers[i].mlp.gate.weight.float().T)  # (B*T, E)
        expected.append(loop_balance_loss(scores.view(3, 16, 8).detach(), idx.view(3, 16, 2)))
        assert metrics[f"moe/l{i}/seq_balance"].item() == pytest.approx(expected[-1], rel=1e-5)
    assert metrics["seq_balance_loss"].item() == pytest.approx(sum(expected), rel=1e-5)
    torch.testing.assert_close(loss.detach(), metrics["lm_loss"] + 0.01 * metrics["seq_balance_loss"])
    # Per sequence, not over the pooled batch: pooling the 48 tokens gives another number.
    flat, idx = seen[1]
    pooled = loop_balance_loss(torch.sigmoid(flat @ model.model.layers[1].mlp.gate.weight.T)[None].detach(), idx[None])
    assert abs(pooled - expected[0]) > 1e-3
    assert all(layer.mlp.gate.routing is None for layer in model.model.layers[1:]), "read once, then cleared"


def test_the_loss_reaches_the_router_weights_but_not_what_comes_after_the_routers():
    model = small_model(seq_aux_loss_alpha=0.01).train()
    model(batch()[0])
    balance = sum(take_balance_losses(model).values())
    balance.backward()
    for layer in model.model.layers[1:]:
        assert layer.mlp.gate.weight.grad is not None and layer.mlp.gate.weight.grad.abs().sum() > 0
    # f is a count, and no expert output enters the loss: the last MoE layer's experts and the head
    # get no gradient from it (earlier layers do, through the hidden states the routers read).
    last = model.model.layers[-1].mlp
    after = [last.experts.gate_up_proj, last.experts.down_proj, model.lm_head.weight, model.model.norm.weight]
    assert all(p.grad is None for p in after)


def test_alpha_zero_adds_nothing_and_validation_stays_cross_entropy():
    x, y = batch()
    model = small_model().train()  # seq_aux_loss_alpha = 0 by default
    loss, metrics = deepseek_lm_loss(model, (x, y))
    assert torch.equal(loss, lm_loss(model, (x, y))[0])  # no dropout: the same forward, the same number
    assert "seq_balance_loss" not in metrics and model.model.layers[1].mlp.gate.routing is None
    weighted = small_model(seq_aux_loss_alpha=0.5).eval()
    loss, metrics = deepseek_lm_loss(weighted, (x, y))
    assert torch.equal(loss, lm_loss(weighted, (x, y))[0]) and "seq_balance_loss" not in metrics


def test_negative_alpha_is_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"seq_aux_loss_alpha=-0.1 must be >= 0.*0 turns the loss off"):
        small_config(seq_aux_loss_alpha=-0.1)


def test_alpha_round_trips_through_config_json_and_transformers_accepts_it():
    from architectures.deepseek_v3.config import from_hf_config, to_hf_config

    d = json.loads(json.dumps(to_hf_config(small_config(seq_aux_loss_alpha=0.003))))
    assert from_hf_config(d).seq_aux_loss_alpha == 0.003
    ref = transformers.DeepseekV3Config(**{k: v for k, v in d.items() if k not in ("model_type", "architectures")})
    assert ref.n_routed_experts == 8 and ref.seq_aux_loss_alpha == 0.003  # an unknown key is kept, not refused


def test_balance_loss_alone_evens_out_a_planted_imbalance():
    """A router whose experts 0 and 1 score high for every token (over 75% of the assignments),
    trained on alpha * L_Bal only, with the bias left at 0: the busiest expert falls from over 3x
    the mean load to under 1.5x."""
    cfg = DeepseekV3Config(hidden_size=32, n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1,
                           seq_aux_loss_alpha=1.0)
    r = Router(cfg)
    r.keep_routing = True  # as DeepseekMoE sets it when seq_aux_loss_alpha > 0
    torch.nn.init.normal_(r.weight, std=0.1, generator=torch.Generator().manual_seed(0))
    u = torch.nn.functional.normalize(torch.randn(32, generator=torch.Generator().manual_seed(3)), dim=0)
    with torch.no_grad():
        r.weight[:2] += 4 * u
    x = torch.randn(8 * 64, 32, generator=torch.Generator().manual_seed(4)) + u  # 8 sequences of 64 tokens
    r.train()
    opt = torch.optim.Adam(r.parameters(), lr=0.02)

    def step() -> torch.Tensor:
        r.load.zero_()
        r(x, seq_shape=(8, 64))
        loss = cfg.seq_aux_loss_alpha * sequence_balance_loss(*r.routing)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return r.load / r.load.mean()  # (E,) each expert's load over the mean, before this step

    first = step()
    assert first[:2].sum() / first.sum() > 0.75 and first.max() > 3
    for _ in range(150):
        last = step()
    assert last.max() < 1.5, f"still unbalanced: {last.tolist()}"
    assert torch.equal(r.e_score_correction_bias, torch.zeros(8)), "the loss alone, no bias update"


# ---------------------------------------------------------------------------- two processes

# Per rank, the loads of two routers: each rank alone would move the biases otherwise than their sum.
PLANTED = {0: [[5.0, 0, 1, 2], [9, 1, 1, 1]], 1: [[0.0, 4, 1, 3], [0, 3, 3, 6]]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def routers(loads: list[list[float]]) -> torch.nn.ModuleList:
    cfg = DeepseekV3Config(hidden_size=8, n_routed_experts=4, num_experts_per_tok=2)
    holder = torch.nn.ModuleList([Router(cfg) for _ in loads])
    for r, load in zip(holder, loads):
        r.load.copy_(torch.tensor(load))
    return holder


def micro_batches(rank: int) -> list[torch.Tensor]:
    return [batch(B=2, T=16, seed=10 * rank + i)[0] for i in range(2)]


def worker(out: str) -> None:
    """One rank: the planted loads, then a DDP model with two accumulation micro-batches."""
    from torch.nn.parallel import DistributedDataParallel

    rank = int(os.environ["RANK"])
    torch.distributed.init_process_group("gloo", timeout=timedelta(seconds=60))
    holder = routers(PLANTED[rank])
    update_routing_bias(holder, gamma=0.01)
    model = small_model()
    ddp = DistributedDataParallel(model)
    for i, x in enumerate(micro_batches(rank)):  # the first micro-batch without gradient sync, as the loop does
        with ddp.no_sync() if i == 0 else torch.enable_grad():
            ddp(x).float().pow(2).mean().backward()
    update_routing_bias(model)
    Path(out, f"rank{rank}.json").write_text(json.dumps({
        "planted": [r.e_score_correction_bias.tolist() for r in holder],
        "model": [layer.mlp.gate.e_score_correction_bias.tolist() for layer in model.model.layers[1:]]}))
    # Tear down in order: DDP's reducer holds the gloo group, and a rank that destroys the group while the
    # other is still in a collective aborts the process ("terminate called without an active exception").
    del ddp
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_bias_update_sums_the_loads_of_all_ranks(tmp_path):
    """Two gloo processes with different loads end with identical biases, equal to one process's
    update on the summed loads; through DDP too, with gradient accumulation (DDP broadcasts rank
    0's buffers before every forward, which must not overwrite a rank's own count)."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2",
               OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    procs = [subprocess.Popen([sys.executable, __file__, str(tmp_path)], env=dict(env, RANK=str(r)), cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1], "every rank must apply the same update"

    summed = routers([[a + b for a, b in zip(*layer)] for layer in zip(PLANTED[0], PLANTED[1])])
    update_routing_bias(summed, gamma=0.01)
    assert ranks[0]["planted"] == [r.e_score_correction_bias.tolist() for r in summed]
    alone = routers(PLANTED[0])
    update_routing_bias(alone, gamma=0.01)
    assert ranks[0]["planted"] != [r.e_score_correction_bias.tolist() for r in alone], "rank 0's loads alone differ"

    # One process counting all four micro-batches (the weights are the same on both ranks: no optimizer step).
    model = small_model().train()
    with torch.no_grad():
        for rank in (0, 1):
            for x in micro_batches(rank):
                model(x)
    update_routing_bias(model)
    assert ranks[0]["model"] == [layer.mlp.gate.e_score_correction_bias.tolist() for layer in model.model.layers[1:]]


if __name__ == "__main__":
    worker(sys.argv[1])
