"""Llama 3 under torch.compile's autograd tracing: the same function and gradients as eager, and
RoPE's cos/sin tables computed once in the forward and saved, not recomputed in the backward
(the reason `rope_tables` is a custom op; notes/training-loop.md measures what that saves)."""

import torch
from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
from torch._functorch.aot_autograd import aot_module_simplified

from architectures.llama3 import Llama3, LlamaConfig
from architectures.common.loss import lm_loss


def test_compiled_step_matches_eager_and_keeps_the_rope_tables():
    code: dict[str, str] = {}

    def keep(name):
        def compiler(gm, example_inputs):
            code[name] = gm.code
            return make_boxed_func(gm.forward)
        return compiler

    def backend(gm, example_inputs):
        # The split of the joint graph into forward and backward that inductor uses, without inductor's
        # code generation: the test sees exactly what is saved and what is recomputed.
        return aot_module_simplified(gm, example_inputs, fw_compiler=keep("forward"), bw_compiler=keep("backward"),
                                     partition_fn=min_cut_rematerialization_partition)

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = Llama3(cfg)
    batch = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    eager_loss, _ = lm_loss(model, batch)
    eager_loss.backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled_loss, _ = torch.compile(lm_loss, backend=backend)(model, batch)
    compiled_loss.backward()

    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-6, atol=1e-6)
    for p, g in zip(model.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)
    assert "zoo.rope_tables" in code["forward"]
    assert "cos" not in code["forward"] and "cos" not in code["backward"] and "sin" not in code["backward"]
