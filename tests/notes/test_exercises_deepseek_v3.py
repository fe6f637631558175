"""The answers to the exercises of notes/deepseek-v3.md, computed from the code and compared with the
hints the note gives."""

import torch

from architectures.deepseek_v3 import DeepseekV3Config, update_routing_bias
from architectures.deepseek_v3.moe import Router, sequence_balance_loss


def router(gamma: float) -> Router:
    cfg = DeepseekV3Config(hidden_size=16, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
                           routing_bias_update_speed=gamma)
    return Router(cfg)


def test_one_bias_update_by_hand(hints):
    for gamma, expected in ((0.01, [-0.01, 0.0, 0.01, 0.01]), (0.0, [0.0, 0.0, 0.0, 0.0])):
        r = router(gamma)
        r.load.copy_(torch.tensor([6.0, 2.0, 0.0, 0.0]))
        update_routing_bias(torch.nn.ModuleList([r]))
        torch.testing.assert_close(r.e_score_correction_bias, torch.tensor(expected))
        assert r.load.sum() == 0, "the loads are counted again from zero after an update"
    assert "b = [-0.01, 0, 0.01, 0.01]" in hints("deepseek-v3")


def test_balance_loss_of_a_collapsed_sequence(hints):
    T = 10
    idx = torch.tensor([0, 1]).repeat(1, T, 1)  # (1, T, 2): every token to experts 0 and 1
    peaked = torch.zeros(1, T, 8)
    peaked[..., :2] = 1.0
    assert sequence_balance_loss(peaked, idx).item() == 4.0
    assert abs(sequence_balance_loss(torch.full((1, T, 8), 0.3), idx).item() - 1.0) < 1e-6
    balanced = torch.arange(8).view(1, 4, 2)  # 4 tokens, each expert chosen once: f_i = 1 for every i
    assert abs(sequence_balance_loss(torch.full((1, 4, 8), 0.3), balanced).item() - 1.0) < 1e-6
    assert "so 4" in hints("deepseek-v3") and "the sum is 1" in hints("deepseek-v3")
