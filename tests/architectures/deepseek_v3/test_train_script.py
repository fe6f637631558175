"""The contract's command lines: train.py writes a checkpoint that generate.py and from_pretrained
read, and each MoE layer's load imbalance reaches metrics.jsonl through the shared loop."""

import json

import torch

from architectures.deepseek_v3 import DeepseekV3, DeepseekV3Config, from_pretrained
from architectures.deepseek_v3.losses import bias_update_step as on_step, deepseek_lm_loss
from architectures.deepseek_v3.train import main as train_main
from training.train_config import TrainConfig
from training.trainer import train
from inference.generate import main as generate_main


def test_train_logs_expert_loads_and_generate_reads_the_checkpoint(tiny_train_run, tmp_path, capsys):
    out, summary, printed = tiny_train_run(train_main)
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_entries = [e for e in logged if "loss" in e]
    assert [e["step"] for e in train_entries] == [2, 4]
    for e in train_entries:  # layer 0 is dense (first_k_dense_replace=1); 1..3 are MoE
        assert {"moe/l1/max_load", "moe/l3/max_load"} <= set(e) and "moe/l0/max_load" not in e
        assert 1.0 <= e["moe/l1/max_load"] <= 8.0  # 8 experts: from perfectly balanced to all on one
    model = from_pretrained(out)
    assert model.config.n_routed_experts == 8 and not model.training
    text = generate_main(["--checkpoint", str(out), "--prompt", "Line 3", "--max-new-tokens", "10", "--seed", "1"])
    assert text.startswith("Line 3") and len(text) > len("Line 3")


def test_the_loop_moves_the_routing_biases_through_on_step():
    """train.py's `on_step` in the shared loop: after each optimizer step every MoE layer's bias
    has moved by gamma times the sign of its load gap, and the counted loads start again from 0."""
    torch.manual_seed(0)
    cfg = DeepseekV3Config(vocab_size=40, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                           num_hidden_layers=2, num_attention_heads=2, n_routed_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=32, routing_bias_update_speed=0.01)
    model = DeepseekV3(cfg)
    data = torch.randint(0, 40, (200,), generator=torch.Generator().manual_seed(0))

    def sample_batch(split, n, generator):
        starts = torch.randint(0, 200 - 17, (n,), generator=generator).tolist()
        return torch.stack([data[s:s + 16] for s in starts]), torch.stack([data[s + 1:s + 17] for s in starts])

    steps = []
    train(model, deepseek_lm_loss, sample_batch,
          TrainConfig(max_steps=3, batch_size=4, block_size=16, warmup_steps=1, eval_interval=3, eval_batches=1,
                      log_interval=1, device="cpu"),
          on_step=lambda step, m: (steps.append(step), on_step(step, m)))
    assert steps == [1, 2, 3]
    gate = model.model.layers[1].mlp.gate
    # Three updates of +-0.01 (or 0 where an expert sat exactly at the mean) per expert.
    assert gate.e_score_correction_bias.abs().max() > 0
    assert torch.all(gate.e_score_correction_bias.abs() <= 0.03 + 1e-7)
    assert gate.load.sum() == 0, "loads are counted in training mode only, and reset by each update"
