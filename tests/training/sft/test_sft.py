"""SFT: chat rendering with response-only labels, packing that equals separate rows, the built-in
tasks' held-out split, the dataset loaders, the train script, and its errors."""

import json

import pytest
import torch

from architectures.llama3 import from_pretrained
from training import tasks
from training.chat import Llama3Chat, ZooChat, chat_format, load_conversations
from training.sft.batch import SFTBatches, encode_all, pack
from training.sft.loss import sft_loss
from training.tokenizer import Tokenizer

CONVERSATION = [{"role": "user", "content": "What is 12 + 30?"}, {"role": "assistant", "content": "42"},
                {"role": "user", "content": "And 1 - 2?"}, {"role": "assistant", "content": "-1"}]


@pytest.fixture(scope="module")
def tokenizer(chat_base):
    return Tokenizer.from_file(chat_base)


def test_response_only_labels_token_by_token(tokenizer):
    fmt = ZooChat(tokenizer)
    ids, trained = fmt.render(CONVERSATION)
    enc = tokenizer.encode
    bos, eos, user, asst = (tokenizer.token_to_id(t) for t in ("<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>"))
    expected = ([bos, user] + enc("What is 12 + 30?") + [eos, asst] + enc("42") + [eos]
                + [user] + enc("And 1 - 2?") + [eos, asst] + enc("-1") + [eos])
    assert ids == expected
    batch = pack([encode_all([CONVERSATION], fmt, 64)], 64, tokenizer.pad_id, packed=False)
    labels = batch["labels"][0].tolist()
    # Exactly the assistant's answers and their end-of-turn tokens are targets, each at the
    # position before it; everything else (prompt, headers, user turns) is -100.
    kept = [(i, t) for i, t in enumerate(labels) if t != -100]
    want = [(i - 1, ids[i]) for i in range(1, len(ids)) if trained[i]]
    assert kept == want
    assert [t for _, t in kept] == enc("42") + [eos] + enc("-1") + [eos]


LLAMA3_TEMPLATE = (  # the chat template published with Meta's Llama 3 instruct checkpoints
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def llama3_style_tokenizer(tmp_path):
    """A byte-level BPE with Llama 3's special tokens, saved as tokenizer.json."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok.train_from_iterator(["What is 12 + 30? The answer is 42.\n\nsystem user assistant " * 50],
                            trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "tokenizer.json"))
    return tmp_path / "tokenizer.json"


def test_llama3_format_matches_transformers_chat_template(tmp_path):
    from transformers import PreTrainedTokenizerFast

    path = llama3_style_tokenizer(tmp_path)
    hf = PreTrainedTokenizerFast(tokenizer_file=str(path), bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    hf.chat_template = LLAMA3_TEMPLATE
    ours = chat_format(Tokenizer.from_file(path))
    assert isinstance(ours, Llama3Chat)
    messages = [{"role": "system", "content": "Be brief. "}] + CONVERSATION
    want = hf.apply_chat_template(messages, tokenize=True, return_dict=False)
    assert ours.render(messages)[0] == list(want)
    prompt = hf.apply_chat_template(messages[:2], tokenize=True, add_generation_prompt=True, return_dict=False)
    assert ours.prompt(messages[:2]) == list(prompt)


def packed_and_separate(tokenizer, block=128):
    fmt = ZooChat(tokenizer)
    enc = encode_all([e.conversation() for e in tasks.arithmetic("train", 5)] + [CONVERSATION], fmt, block)
    packed = pack([enc[:3], enc[3:]], block, tokenizer.pad_id, packed=True)
    separate = pack([[e] for e in enc], block, tokenizer.pad_id, packed=False)
    return packed, separate


def test_packed_loss_equals_unpacked_loss_with_gradients(chat_base, tokenizer):
    model = from_pretrained(chat_base)
    packed, separate = packed_and_separate(tokenizer)
    assert packed["input_ids"].shape[0] == 2 and separate["input_ids"].shape[0] == 6
    a, ma = sft_loss(model, packed)
    ga = torch.autograd.grad(a, list(model.parameters()))
    b, mb = sft_loss(model, separate)
    gb = torch.autograd.grad(b, list(model.parameters()))
    assert int(ma["num_tokens"]) == int(mb["num_tokens"]) > 0
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)
    c, _ = sft_loss(model, packed, chunk_size=7)  # the chunked head gives the same sum
    torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-5)


def test_packed_rows_work_for_latent_attention(tokenizer):
    from architectures.deepseek_v3 import DeepseekV3, preset

    import dataclasses
    cfg = dataclasses.replace(preset("tiny"), vocab_size=tokenizer.vocab_size)
    torch.manual_seed(0)
    model = DeepseekV3(cfg).eval()
    packed, separate = packed_and_separate(tokenizer)
    torch.testing.assert_close(sft_loss(model, packed)[0], sft_loss(model, separate)[0], rtol=1e-5, atol=1e-5)


def test_packing_refuses_a_model_with_recurrent_state(tokenizer):
    from architectures.mamba2_hybrid import Mamba2Hybrid, preset

    import dataclasses
    model = Mamba2Hybrid(dataclasses.replace(preset("tiny"), vocab_size=tokenizer.vocab_size))
    packed, separate = packed_and_separate(tokenizer)
    with pytest.raises(ValueError, match="--pack false"):
        sft_loss(model, packed)
    assert torch.isfinite(sft_loss(model, separate)[0])  # one conversation per row is fine


def test_batches_depend_only_on_the_generator(tokenizer):
    fmt = ZooChat(tokenizer)
    enc = encode_all([e.conversation() for e in tasks.arithmetic("train", 50)], fmt, 64)
    batches = SFTBatches(enc, enc[:5], 64, tokenizer.pad_id)
    one = batches("train", 3, torch.Generator().manual_seed(7))
    two = batches("train", 3, torch.Generator().manual_seed(7))
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert (one["doc_ids"].max(dim=1).values >= 1).all()  # rows hold several conversations


def test_held_out_questions_never_appear_in_training(chat_base):
    train = {e.prompt[0]["content"] for e in tasks.arithmetic("train", 3000, max_digits=2)}
    test = {e.prompt[0]["content"] for e in tasks.arithmetic("test", 500, max_digits=2)}
    assert len(train) == 3000 and len(test) == 500 and not train & test
    assert tasks.arithmetic("train", 20, max_digits=3) == tasks.arithmetic("train", 20, max_digits=3)  # deterministic
    e = tasks.arithmetic("test", 1)[0]
    a, op, b = e.prompt[0]["content"].removeprefix("What is ").removesuffix("?").split()
    assert int(e.answer) == (int(a) + int(b) if op == "+" else int(a) - int(b))


def test_speaker_task_splits_lines_and_answers_from_the_play():
    text = "".join(f"ALICE:\nA line of hers, number {i}.\n\nBOB:\nAnd his reply, number {i}.\n\n" for i in range(300))
    train, test = tasks.speaker(text, "train", 10**6), tasks.speaker(text, "test", 10**6)
    assert train and test and not {e.prompt[0]["content"] for e in train} & {e.prompt[0]["content"] for e in test}
    assert all(e.answer == ("ALICE" if "hers" in e.prompt[0]["content"] else "BOB") for e in train + test)


@pytest.mark.parametrize("records, expected", [
    ([{"messages": CONVERSATION}], CONVERSATION),
    ([{"instruction": "Add.", "input": "12 + 30", "output": "42"}],
     [{"role": "user", "content": "Add.\n\n12 + 30"}, {"role": "assistant", "content": "42"}]),
    ([{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}],
     [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]),
])
def test_loaders_read_messages_alpaca_and_sharegpt_files(tmp_path, monkeypatch, records, expected):
    monkeypatch.setenv("ZOO_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert load_conversations(str(path)) == [expected]


def test_a_conversation_without_an_assistant_turn_is_refused(tokenizer):
    with pytest.raises(ValueError, match="no assistant turn"):
        ZooChat(tokenizer).render([{"role": "user", "content": "Hello?"}])


def test_a_role_the_format_does_not_know_is_refused(tokenizer):
    with pytest.raises(ValueError, match="role 'tool' is not one this chat format knows"):
        ZooChat(tokenizer).render([{"role": "tool", "content": "{}"}, {"role": "assistant", "content": "ok"}])


def test_a_conversation_longer_than_a_packed_row_is_refused(tokenizer):
    long = [{"role": "user", "content": "to be or not " * 40}, {"role": "assistant", "content": "yes"}]
    with pytest.raises(ValueError, match="more than a row holds"):
        encode_all([long], ZooChat(tokenizer), 32)


def test_a_packed_row_longer_than_the_block_size_is_refused(tokenizer):
    enc = encode_all([e.conversation() for e in tasks.arithmetic("train", 6)], ZooChat(tokenizer), 64)
    with pytest.raises(ValueError, match="more than block_size 32"):
        pack([enc], 32, tokenizer.pad_id, packed=True)


def test_sft_train_script_runs_and_reports_exact_match(chat_base, tmp_path, monkeypatch, capsys):
    from training.sft.train import main

    monkeypatch.setenv("ZOO_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "sft"
    summary = main(["--preset", "tiny", "--base", str(chat_base), "--out", str(out), "--max-steps", "3",
                    "--batch-size", "4", "--block-size", "64", "--eval-interval", "3", "--eval-batches", "1",
                    "--arithmetic-examples", "40", "--speaker-examples", "0", "--eval-examples", "4",
                    "--val-conversations", "8", "--loss-chunk", "16"])
    printed = capsys.readouterr().out
    assert "held-out exact match, arithmetic" in printed
    assert set(summary["exact_match_after"]) == {"arithmetic"}
    for name in ("config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl", "summary.json"):
        assert (out / name).is_file(), name
    assert from_pretrained(out).config == from_pretrained(chat_base).config


def test_sft_base_without_tokenizer_is_a_one_line_error(tmp_path, command_error, chat_base):
    from training.sft.train import main

    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text((chat_base / "config.json").read_text())
    line = command_error(main, ["--base", str(tmp_path / "base"), "--out", str(tmp_path / "o")])
    assert "has no tokenizer.json" in line
