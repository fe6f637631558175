"""`python -m inference.generate` with chat models and LoRA adapters.

--chat: a checkpoint written by a chat method (here, two real steps of training.sft) is asked in its
chat format without being told to: the ids fed to the model are the format's prompt, generation
stops at the format's end of turn, and only the reply is printed, without special tokens. The
format is the one the run's training record (trainer_state.pt) names, checked against what
training writes.

--adapter: a LoRA adapter in PEFT's format (as training.lora.train saves it) merged into its base:
the model sampled from gives the logits of the base with the adapter applied; a folder that is no
adapter, an adapter that does not fit the base, and an adapter whose base is unknown are one line.
"""

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from architectures import registry
from architectures.llama3 import Llama3, save_pretrained
from inference import generate
from inference.checkpoint_files import STATE_FILE, recorded_chat_format, trained_block_size, training_record
from training.chat import chat_format
from training.inference_setup import load_checkpoint
from training.lora import LoRAConfig, apply_lora, load_adapter, save_adapter
from training.lora.lora import ALL_PROJECTIONS, lora_layers
from training.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[2]
QUESTION = "What is 12 + 30?"
CPU = ["--device", "cpu", "--temperature", "0"]


# ---- which method wrote a folder ---------------------------------------------------------------------

def test_the_training_record_names_sfts_chat_format_as_training_writes_it(sft_checkpoint):
    from training.checkpointing import read_record

    assert training_record(sft_checkpoint) == read_record(sft_checkpoint), "the same record training reads back"
    assert recorded_chat_format(sft_checkpoint) == "zoo"
    assert trained_block_size(sft_checkpoint) == 64


def test_a_folder_without_a_recorded_chat_format_is_not_a_chat_model(sft_checkpoint, tmp_path):
    pretrained = tmp_path / "pretrained"
    pretrained.mkdir()
    torch.save({"step": 1, "record": {"train": {"block_size": 16}}}, pretrained / STATE_FILE)  # as pretraining saves it
    assert recorded_chat_format(pretrained) is None
    copy = tmp_path / "copy"  # the model files alone, without their training record
    shutil.copytree(sft_checkpoint, copy, ignore=shutil.ignore_patterns(STATE_FILE, "train_state"))
    assert recorded_chat_format(copy) is None


# ---- --chat ------------------------------------------------------------------------------------------

def test_an_sft_checkpoint_is_asked_in_its_chat_format_and_prints_the_reply_alone(sft_checkpoint, monkeypatch,
                                                                                   capsys):
    tokenizer = Tokenizer.from_file(sft_checkpoint)
    fmt = chat_format(tokenizer)
    fed = []

    def fake_stream(model, prompt_ids, params, stop_ids=(), **kw):
        fed.append((prompt_ids, set(stop_ids)))
        # "42", a special token in the middle, then the end of turn: what a model may say
        yield from tokenizer.encode("4") + [tokenizer.token_to_id("<|user|>")] + tokenizer.encode("2") + \
            list(fmt.stop_ids)

    monkeypatch.setattr(generate, "stream", fake_stream)
    reply = generate.main(["--checkpoint", str(sft_checkpoint), "--prompt", QUESTION] + CPU)
    prompt_ids, stop_ids = fed[0]
    assert prompt_ids == fmt.prompt([{"role": "user", "content": QUESTION}])
    assert prompt_ids[:2] == fmt.begin() + fmt.header("user")
    assert set(fmt.stop_ids) <= stop_ids
    assert reply == "42" and capsys.readouterr().out == "42\n", "the reply alone, without special tokens"


def test_chat_runs_for_real_and_no_chat_sends_plain_text(sft_checkpoint, capsys):
    reply = generate.main(["--checkpoint", str(sft_checkpoint), "--prompt", QUESTION, "--max-new-tokens", "8"] + CPU)
    out = capsys.readouterr().out
    assert out == reply + "\n" and "<|" not in out and QUESTION not in out
    text = generate.main(["--checkpoint", str(sft_checkpoint), "--prompt", QUESTION, "--max-new-tokens", "2",
                          "--no-chat"] + CPU)
    assert text.startswith(QUESTION) and capsys.readouterr().out.startswith(QUESTION)


def test_chat_on_a_plain_checkpoint_is_asked_for(chat_base, monkeypatch, capsys):
    fed = []
    monkeypatch.setattr(generate, "stream", lambda model, ids, params, **kw: fed.append(ids) or iter(()))
    generate.main(["--checkpoint", str(chat_base), "--prompt", QUESTION] + CPU)
    assert fed[-1] == Tokenizer.from_file(chat_base).encode(QUESTION), "no training record: plain text"
    generate.main(["--checkpoint", str(chat_base), "--prompt", QUESTION, "--chat"] + CPU)
    assert fed[-1] == chat_format(Tokenizer.from_file(chat_base)).prompt([{"role": "user", "content": QUESTION}])


def test_generate_chat_in_a_fresh_process_prints_no_traceback(sft_checkpoint):
    proc = subprocess.run([sys.executable, "-m", "inference.generate", "--checkpoint", str(sft_checkpoint),
                           "--prompt", QUESTION, "--max-new-tokens", "4", *CPU], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "<|" not in proc.stdout and QUESTION not in proc.stdout


# ---- --adapter ---------------------------------------------------------------------------------------

def save_tiny_adapter(base: Path, out: Path, base_name: str | None, seed: int = 0) -> None:
    """A LoRA adapter on every projection of `base`, with B not zero (a trained adapter changes the model),
    saved as training.lora.train saves one: PEFT's files and the tokenizer beside them."""
    model = registry.from_pretrained(base)
    apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=ALL_PROJECTIONS))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.05)
    out.mkdir(parents=True)
    save_adapter(model, out, base_model_name_or_path=base_name)
    Tokenizer.from_file(base).save(out / "tokenizer.json")


@pytest.fixture(scope="module")
def adapter(chat_base, tmp_path_factory):
    out = tmp_path_factory.mktemp("adapter") / "lora"
    save_tiny_adapter(chat_base, out, str(chat_base))
    return out


def test_the_adapter_is_loaded_onto_the_base_it_records_and_gives_the_adapted_logits(chat_base, adapter):
    args = generate.parse_args(["--adapter", str(adapter), "--prompt", QUESTION])
    model, tokenizer, folders = load_checkpoint(args.checkpoint, args.adapter, torch.device("cpu"), torch.float32)
    assert folders == [chat_base, adapter]
    ids = torch.tensor([tokenizer.encode(QUESTION)])
    reference = load_adapter(registry.from_pretrained(chat_base), adapter)  # the adapter applied, not merged
    plain = registry.from_pretrained(chat_base)
    with torch.no_grad():
        got, want, base = model(ids), reference(ids), plain(ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, base, atol=1e-3), "the adapter changes the model"


def test_generate_with_an_adapter_and_an_explicit_base(chat_base, adapter, capsys):
    text = generate.main(["--adapter", str(adapter), "--checkpoint", str(chat_base), "--prompt", "Line 3",
                          "--max-new-tokens", "4"] + CPU)
    assert text.startswith("Line 3") and capsys.readouterr().out == text + "\n"


def test_adapter_mistakes_are_one_line(chat_base, adapter, tmp_path, command_error):
    def error(*argv):
        return command_error(generate.main, [*argv, "--prompt", QUESTION, "--device", "cpu"])

    assert "is a whole model (config.json), not a LoRA adapter; pass it as --checkpoint" in \
        error("--adapter", str(chat_base))
    assert f"--adapter {tmp_path} is not a LoRA adapter: it has no adapter_config.json" in error("--adapter", str(tmp_path))
    assert f"--checkpoint {adapter} holds a LoRA adapter" in error("--checkpoint", str(adapter))
    nameless = tmp_path / "nameless"
    save_tiny_adapter(chat_base, nameless, None)
    assert "records no base model" in error("--adapter", str(nameless))
    assert "pass the model it was trained on as --checkpoint DIR" in error("--adapter", str(nameless))
    hub = tmp_path / "hub"
    save_tiny_adapter(chat_base, hub, "meta-llama/Llama-3.2-1B")
    assert "was trained on 'meta-llama/Llama-3.2-1B', which is not a local directory" in error("--adapter", str(hub))
    # Another base: the same modules, other widths; then an adapter of modules this base does not have.
    wider = tmp_path / "wider"
    cfg = dataclasses.replace(registry.from_pretrained(chat_base).config, intermediate_size=96)
    save_pretrained(Llama3(cfg), wider)
    Tokenizer.from_file(chat_base).save(wider / "tokenizer.json")
    line = error("--adapter", str(adapter), "--checkpoint", str(wider))
    assert line == (f"error: --adapter {adapter} does not fit the base model {wider}: model.layers.0.mlp.gate_proj."
                    f"lora_B.weight: adapter (128, 4) vs base (96, 4) (and 5 more differences); pass the model it "
                    f"was trained on as --checkpoint")
    config = json.loads((adapter / "adapter_config.json").read_text())
    other = tmp_path / "other"
    shutil.copytree(adapter, other)
    (other / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["w1", "w2"]}))
    assert "matches no linear module" in error("--adapter", str(other))
