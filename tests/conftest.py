"""Fixtures shared by the tests of every folder: a small corpus, a config editor, and a tiny random
Llama 3 with a batch of prompts of different lengths."""

import json

import pytest
import torch

from architectures.llama3 import Llama3, LlamaConfig

# A small corpus with a repeating structure: a few training steps on it are enough to exercise
# the command lines end to end.
SMALL_CORPUS = "".join(f"Line {i}: to be, or not to be, that is the question.\n" for i in range(400))


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    """SMALL_CORPUS as a text file, with the zoo's caches redirected into tmp_path."""
    monkeypatch.setenv("ZOO_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "corpus.txt"
    path.write_text(SMALL_CORPUS)
    return path


@pytest.fixture
def edit_config():
    """edit_config(checkpoint_dir, **fields): overwrite fields of a checkpoint's config.json in place,
    to build a config that disagrees with the weights beside it."""
    def edit(directory, **fields):
        path = directory / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))
    return edit


def tiny_config(**kw) -> LlamaConfig:
    # initializer_range=0.2 spreads the logits, so greedy argmaxes are far from ties and the
    # fp32 rounding differences between cache layouts (~1e-7) cannot flip a token.
    base = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2)
    return LlamaConfig(**{**base, **kw})


@pytest.fixture(scope="session")
def model():
    torch.manual_seed(0)
    return Llama3(tiny_config()).eval()


@pytest.fixture(scope="session")
def prompts():
    """Lengths around block boundaries (block_size 4 in the tests), and a one-token prompt."""
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 97, (n,), generator=g).tolist() for n in (5, 17, 33, 1, 40, 16, 8)]


@pytest.fixture
def command_error(capsys):
    """command_error(main, argv): run a command's main, which must fail as a user error does (non-zero
    exit, one `error: ...` line on stderr); returns that line."""
    def run(main, argv):
        with pytest.raises(SystemExit) as exit:
            main(argv)
        assert exit.value.code not in (0, None)
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
        return lines[0]
    return run


@pytest.fixture
def tiny_train_run(corpus, tmp_path, capsys):
    """tiny_train_run(train_main) -> (out, summary, printed): a family's train.py for 4 tiny steps on the
    small corpus, checked to write every file of the contract and to print a sample."""
    def run(train_main):
        out = tmp_path / "run"
        summary = train_main(["--preset", "tiny", "--dataset", str(corpus), "--out", str(out), "--max-steps", "4",
                              "--batch-size", "4", "--block-size", "32", "--eval-interval", "2", "--eval-batches", "1",
                              "--log-interval", "2", "--bpe-vocab-size", "300"])
        for name in ("config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl", "loss.png", "summary.json"):
            assert (out / name).is_file(), name
        assert summary["steps"] == 4 and summary["val_nats_per_char"] > 0
        printed = capsys.readouterr().out
        assert "---- sample ----" in printed
        return out, summary, printed
    return run


@pytest.fixture(scope="session")
def chat_base(tmp_path_factory):
    """A checkpoint directory to fine-tune: a tiny random Llama 3 with a zoo BPE tokenizer (which
    reserves <|user|> and <|assistant|>), as the quick start would leave one."""
    from architectures.llama3 import save_pretrained
    from training.tokenizer import Tokenizer

    out = tmp_path_factory.mktemp("chat_base")
    tokenizer = Tokenizer.train(SMALL_CORPUS + "What is 12 + 30? 0123456789 - Who says:", 300)
    torch.manual_seed(0)
    save_pretrained(Llama3(tiny_config(vocab_size=tokenizer.vocab_size, initializer_range=0.02)), out)
    tokenizer.save(out / "tokenizer.json")
    return out
