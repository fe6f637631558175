"""`python -m training.lora.train`: LoRA SFT and QLoRA on the shared loop, writing a PEFT-format adapter."""

import pytest
import torch

from architectures.llama3 import from_pretrained
from training.lora import load_adapter, trainable_parameters

TINY = ["--max-steps", "2", "--batch-size", "4", "--block-size", "64", "--eval-interval", "2", "--eval-batches", "1",
        "--arithmetic-examples", "40", "--speaker-examples", "0", "--eval-examples", "3", "--val-conversations", "8"]


@pytest.mark.parametrize("extra", [[], ["--quantize", "nf4", "--r", "4"], ["--use-dora", "true"]])
def test_lora_train_writes_an_adapter_that_loads_back(chat_base, tmp_path, monkeypatch, capsys, extra):
    from training.lora.train import main

    monkeypatch.setenv("ZOO_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "lora"
    summary = main(["--preset", "tiny", "--base", str(chat_base), "--out", str(out)] + TINY + extra)
    printed = capsys.readouterr().out
    assert "trainable parameters:" in printed and "held-out exact match, arithmetic" in printed
    assert 0 < summary["trainable_parameters"] < summary["total_parameters"]
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "metrics.jsonl"):
        assert (out / name).is_file(), name
    if not extra:  # the adapter changed the model, and loads back onto a fresh base
        model = load_adapter(from_pretrained(chat_base), out)
        base = from_pretrained(chat_base)
        ids = torch.randint(0, base.config.vocab_size, (1, 12))
        assert not torch.allclose(model(ids), base(ids))
        assert trainable_parameters(model)[0] == summary["trainable_parameters"]


def test_lora_rank_below_one_is_a_one_line_error(chat_base, tmp_path, command_error):
    from training.lora.train import main

    line = command_error(main, ["--base", str(chat_base), "--out", str(tmp_path / "o"), "--r", "0"] + TINY)
    assert "rank r must be an integer >= 1" in line


@pytest.mark.parametrize("mode", ["special", "all"])
def test_token_rows_experiment_trains_the_chosen_embedding_rows_only(chat_base, tmp_path, monkeypatch, mode):
    from training.lora.experiments.token_rows import main

    monkeypatch.setenv("ZOO_CACHE_DIR", str(tmp_path / "cache"))
    before = from_pretrained(chat_base).model.embed_tokens.weight
    from training.sft import finetune

    seen = {}
    real_fit = finetune.fit

    def fit(p, args, save):  # keep the trained model to compare its embedding with the base's
        seen["model"] = p.model
        return real_fit(p, args, save)
    monkeypatch.setattr(finetune, "fit", fit)
    main([mode, "--preset", "tiny", "--base", str(chat_base), "--out", str(tmp_path / "x")] + TINY)
    changed = (seen["model"].model.embed_tokens.weight.detach() != before).any(dim=1)
    assert changed[[0, 1, 3, 4]].all()  # bos, eos, user, assistant (padding sits where no loss reaches it)
    assert changed[5:].any() == (mode == "all")
