"""The contract's command lines: train.py writes a checkpoint that generate.py and from_pretrained
read, and the MoE's routing statistics reach metrics.jsonl through the shared loop."""

import json

import pytest

from architectures.mixtral import from_pretrained
from architectures.mixtral.train import main as train_main
from inference.generate import main as generate_main


def test_train_logs_routing_and_generate_reads_the_checkpoint(tiny_train_run, tmp_path, capsys):
    out, summary, printed = tiny_train_run(train_main)
    # The terminal says the training loss is more than the cross-entropy the validation loss is.
    assert "step 2/4: train loss (lm + aux) " in printed and "val loss " in printed
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_entries = [e for e in logged if "loss" in e]
    assert [e["step"] for e in train_entries] == [2, 4]
    for e in train_entries:
        assert {"lm_loss", "aux_loss", "z_loss", "moe/l3/load_e7", "moe/l0/load_entropy", "moe/l0/router_entropy"} <= set(e)
        assert sum(e[f"moe/l0/load_e{i}"] for i in range(8)) == pytest.approx(1.0)
        # The logged loss is the training objective: cross-entropy plus the weighted auxiliary terms.
        assert e["loss"] == pytest.approx(e["lm_loss"] + 0.01 * e["aux_loss"] + 0.001 * e["z_loss"], rel=1e-5)
    model = from_pretrained(out)
    assert model.config.num_local_experts == 8 and not model.training
    text = generate_main(["--checkpoint", str(out), "--prompt", "Line 3", "--max-new-tokens", "10", "--seed", "1"])
    assert text.startswith("Line 3") and len(text) > len("Line 3")
