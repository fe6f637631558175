"""`python -m inference.chat`: a terminal chat that is a client of the server. Its first greedy reply is
what `python -m inference.generate` prints for the same question; the conversation is kept and sent back
whole; /system and /reset start over; a server error ends one turn, not the chat."""

import pytest
import torch

from inference import chat, generate
from inference.engine import EngineConfig
from inference.server import ServerThread
from training.inference_setup import load_checkpoint, server_app

QUESTION = "What is 12 + 30?"
GREEDY = ["--temperature", "0", "--max-tokens", "12"]


@pytest.fixture(scope="module")
def server(sft_checkpoint):
    model, tokenizer, folders = load_checkpoint(sft_checkpoint, None, torch.device("cpu"), torch.float32)
    engine = EngineConfig(block_size=4, num_blocks=256, max_num_seqs=4, max_num_batched_tokens=256)
    server = ServerThread(server_app(model, tokenizer, folders, "tiny-sft", engine)).start()
    yield server
    server.stop()


def test_a_conversation_keeps_its_turns_and_the_first_reply_is_generates(sft_checkpoint, server, capsys):
    want = generate.main(["--checkpoint", str(sft_checkpoint), "--prompt", QUESTION, "--temperature", "0",
                          "--max-new-tokens", "12", "--device", "cpu"])
    capsys.readouterr()
    history = chat.main(["--url", server.url] + GREEDY, lines=[QUESTION, "And 1 + 1?", "/quit", "never sent"])
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    assert history[1]["content"] == want
    assert capsys.readouterr().out.startswith(want + "\n")


def test_system_and_reset_start_over(server, capsys):
    history = chat.main(["--url", server.url] + GREEDY,
                        lines=[QUESTION, "/system Answer with a number.", "/reset", QUESTION, "/bogus"])
    assert history[0] == {"role": "system", "content": "Answer with a number."}
    assert [m["role"] for m in history] == ["system", "user", "assistant"], "turns before /reset are gone"
    out = capsys.readouterr().out
    assert "system prompt: Answer with a number." in out and "unknown command /bogus" in out


def test_a_reply_that_does_not_fit_is_an_error_line_and_the_chat_goes_on(server, capsys):
    history = chat.main(["--url", server.url, "--temperature", "0", "--max-tokens", "1000"], lines=[QUESTION])
    assert history == [] and "error: the server answered 400" in capsys.readouterr().out


def test_a_server_that_is_not_there_is_one_line(command_error):
    line = command_error(chat.main, ["--url", "http://127.0.0.1:9"])  # nothing listens on the discard port
    assert "cannot reach the server at http://127.0.0.1:9" in line


@pytest.mark.slow
def test_with_a_checkpoint_the_server_runs_in_process(sft_checkpoint, capsys):
    history = chat.main(["--checkpoint", str(sft_checkpoint), "--device", "cpu"] + GREEDY, lines=[QUESTION])
    assert [m["role"] for m in history] == ["user", "assistant"]
