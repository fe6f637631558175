"""The answers to the exercises of notes/sft.md, computed from the code and compared with the hints the
note gives."""

import torch

from architectures.llama3 import preset
from training.sft.batch import PackedRows


def test_what_a_packed_position_sees(hints):
    doc = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2]])
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2]])
    rows = PackedRows(doc, pos)
    seen = {t: rows.mask[0, t].nonzero().flatten().tolist() for t in (4, 7)}
    assert seen == {4: [3, 4], 7: [5, 6, 7]}
    assert rows.positions(1, 8, "cpu")[0, 4].item() == 1
    assert "position 4 sees 3 and 4, position 7 sees 5, 6 and 7" in hints("sft")


def test_memory_of_the_plain_and_the_chunked_loss(hints):
    V = preset("llama-3.2-1b").vocab_size
    plain = 2048 * V * (2 + 4 + 4)  # bf16 logits, their fp32 copy and the fp32 gradient
    chunk = 1024 * V * 4
    assert f"{plain / 1e9:.2f}" == "2.63" and f"{chunk / 1e9:.2f}" == "0.53"
    assert "2,048 x 128,256 x 10 bytes = 2.63 GB" in hints("sft") and "1,024 x 128,256 x 4 bytes = 0.53 GB" in hints("sft")
