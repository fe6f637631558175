"""The contract's command lines: train.py writes a checkpoint (a Gemma3ForCausalLM directory) that
generate.py, from_pretrained and transformers read, and that generates past its window."""

import pytest
import transformers

from architectures.gemma import from_pretrained
from architectures.gemma.train import main as train_main
from inference.generate import main as generate_main


@pytest.mark.slow  # the tiny run's whole-split validation and 80 sampled tokens: about a minute on 2 shared cores
def test_train_writes_a_checkpoint_that_generate_and_transformers_read(tiny_train_run):
    out, summary, printed = tiny_train_run(train_main)
    model = from_pretrained(out)
    assert model.config.layer_types.count("full_attention") == 1 and not model.training
    assert type(transformers.AutoModelForCausalLM.from_pretrained(out)).__name__ == "Gemma3ForCausalLM"
    # 80 new tokens: the prompt and the reply together run past 3 x the 32-token window of the local layers.
    text = generate_main(["--checkpoint", str(out), "--prompt", "Line 3", "--max-new-tokens", "80", "--seed", "1"])
    assert text.startswith("Line 3") and len(text) > len("Line 3")
