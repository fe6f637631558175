"""The contract's command lines: train.py writes a checkpoint that generate.py and from_pretrained read."""

import json

import pytest

from architectures.llama3.train import main as train_main
from inference.generate import main as generate_main
from architectures.llama3.pretrained import from_pretrained as llama_from_pretrained


def train_args(corpus, out, *extra):
    return ["--preset", "tiny", "--dataset", str(corpus), "--out", str(out), "--max-steps", "4",
            "--batch-size", "4", "--block-size", "32", "--eval-interval", "2", "--eval-batches", "1",
            "--log-interval", "1", "--bpe-vocab-size", "300", *extra]


def test_train_writes_contract_files_and_generate_reads_them(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    summary = train_main(train_args(corpus, out))
    for name in ("config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl", "loss.png", "summary.json"):
        assert (out / name).is_file(), name
    assert summary["steps"] == 4 and summary["val_nats_per_char"] > 0
    printed = capsys.readouterr().out
    assert "---- sample ----" in printed and "nats/char" in printed
    model = llama_from_pretrained(out)
    assert model.config.vocab_size == 300 and not model.training
    text = generate_main(["--checkpoint", str(out), "--prompt", "Line 3", "--max-new-tokens", "10", "--seed", "1"])
    assert text.startswith("Line 3") and len(text) > len("Line 3")


def test_resume_from_the_command_line_continues(corpus, tmp_path):
    out = tmp_path / "run"
    train_main(train_args(corpus, out))
    resumed = train_args(corpus, out, "--resume")
    resumed[resumed.index("--max-steps") + 1] = "6"
    train_main(resumed)
    steps = [e["step"] for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in e]
    assert steps == [1, 2, 3, 4, 5, 6]


def refusal(capsys, argv) -> str:
    """The one `error: ...` line with which the command line refuses argv (exit status 2)."""
    with pytest.raises(SystemExit) as refused:
        train_main(argv)
    assert refused.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_block_size_beyond_model_context_is_a_clear_error(corpus, tmp_path, capsys):
    assert "exceeds the model's max_position_embeddings=256" in refusal(
        capsys, train_args(corpus, tmp_path / "run", "--block-size", "512"))
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_model_vocab_size_cannot_be_overridden(corpus, tmp_path, capsys):
    assert "comes from the tokenizer" in refusal(capsys, train_args(corpus, tmp_path / "run", "--vocab-size", "100"))


def test_generate_rejects_bad_sampling_settings(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    train_main(train_args(corpus, out))
    capsys.readouterr()
    for flag, value, message in [("--temperature", "-1", "temperature must be >= 0"),
                                 ("--top-p", "1.5", "top_p must be in (0, 1]"),
                                 ("--top-k", "-2", "top_k must be >= 0")]:
        with pytest.raises(SystemExit) as refused:
            generate_main(["--checkpoint", str(out), "--prompt", "x", flag, value])
        assert message in str(refused.value.code) + capsys.readouterr().err


def test_generate_works_on_a_hugging_face_directory(corpus, tmp_path):
    """A directory as the hub publishes it: transformers' save_pretrained plus a tokenizer.json
    that is not ours (Llama 3 style specials); greedy output equals transformers' generate."""
    import tokenizers
    import torch
    import transformers

    backend = tokenizers.Tokenizer(tokenizers.models.BPE())
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([corpus.read_text()], trainer)
    backend.save(str(tmp_path / "tokenizer.json"))
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=backend.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=1))
    hf.save_pretrained(tmp_path)
    text = generate_main(["--checkpoint", str(tmp_path), "--prompt", "Line 3",
                                                          "--temperature", "0", "--max-new-tokens", "12"])
    prompt = [0] + backend.encode("Line 3").ids  # generate.py prepends <|begin_of_text|> for pretrained tokenizers
    expected = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=1,
                           pad_token_id=1)[0, len(prompt):].tolist()
    expected = [t for t in expected if t != 1]
    assert text == "Line 3" + backend.decode(expected)
