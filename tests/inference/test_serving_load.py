"""The serving load test (`python -m inference.benchmarks.serving_load`), reduced to CI size: 8 concurrent
streaming clients, 40 requests of mixed lengths against a random tiny Llama 3 served in-process. Nothing lost,
nothing duplicated, the pool all free at the end, with clients disconnecting mid-stream too; without
disconnects every served greedy text equals what the engine makes of the same prompts offline."""

import pytest

from inference.benchmarks import serving_load
from inference.benchmarks.serving_clients import Outcome, audit, percentile

SMALL = ["--preset", "tiny", "--device", "cpu", "--clients", "8", "--requests", "40", "--max-prompt", "32",
         "--max-new", "24", "--max-num-seqs", "8"]


@pytest.mark.slow
def test_every_request_is_answered_once_and_matches_the_offline_engine(capsys):
    result = serving_load.main(SMALL)
    served = result["served"]
    assert served["answered"] == 40 and not served["lost"] and not served["duplicated"] and result["pool_empty"]
    assert result["same_text"] == 40, "served greedy texts are the engine's own, request by request"
    assert served["output_tokens"] == result["offline"]["output_tokens"]
    lines = capsys.readouterr().out.splitlines()
    assert [l.split()[1] for l in lines if l.startswith("bench")] == ["mode=served", "mode=offline", "served_vs_offline"]


@pytest.mark.slow
def test_clients_that_disconnect_mid_stream_give_every_block_back():  # in bf16, as on a GPU
    result = serving_load.main(SMALL + ["--disconnect-fraction", "0.3", "--seed", "1", "--dtype", "bf16"])
    served = result["served"]
    assert served["dropped"] > 0 and served["answered"] + served["dropped"] == 40
    assert not served["lost"] and not served["duplicated"] and result["pool_empty"]
    assert "offline" not in result, "no offline comparison when requests were cut short"


def test_the_audit_finds_a_lost_and_a_duplicated_answer():
    ok = Outcome(0, 3, ids={"a"}, finish_reasons=["length"], completion_tokens=3, done=True)
    lost = Outcome(1, 3, ids={"b"}, done=False)
    twice = Outcome(2, 3, ids={"a"}, finish_reasons=["length", "length"], completion_tokens=3, done=True)
    problems = audit([ok, lost, twice])
    assert len(problems["lost"]) == 2  # no finish at all, and two finishes for one completion
    assert any("answer id a" in p for p in problems["duplicated"]) and any("2 finishes" in p for p in problems["duplicated"])
    assert audit([ok]) == {"lost": [], "duplicated": []}


def test_percentiles_interpolate_between_ranks():
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([5], 99) == 5 and percentile(list(range(101)), 99) == 99


def test_bad_workloads_are_one_line(command_error):
    assert "--max-new" in command_error(serving_load.main, SMALL + ["--min-new", "30"])
    assert "--vocab-size" in command_error(serving_load.main, ["--url", "http://127.0.0.1:9"])
    assert "context" in command_error(serving_load.main, SMALL + ["--max-prompt", "250", "--max-new", "24"])
