"""The contract's command lines: train.py writes a checkpoint (the NemotronH layout) that generate.py,
from_pretrained and transformers read."""

import transformers

from architectures.mamba2_hybrid import from_pretrained
from architectures.mamba2_hybrid.train import main as train_main
from inference.generate import main as generate_main


def test_train_writes_a_checkpoint_that_generate_and_transformers_read(tiny_train_run, tmp_path, capsys):
    out, summary, printed = tiny_train_run(train_main)
    model = from_pretrained(out)
    assert model.config.hybrid_override_pattern == "M-M*M-M-" and not model.training
    assert type(transformers.AutoModelForCausalLM.from_pretrained(out)).__name__ == "NemotronHForCausalLM"
    text = generate_main(["--checkpoint", str(out), "--prompt", "Line 3", "--max-new-tokens", "10", "--seed", "1"])
    assert text.startswith("Line 3") and len(text) > len("Line 3")
