"""The benchmark runs end to end on a CPU with a tiny model and prints one parseable line per measurement."""

import pytest

from inference.benchmarks.throughput import main


def parse(out: str) -> dict[str, dict[str, str]]:
    lines = [l for l in out.splitlines() if l.startswith("bench ")]
    rows = [dict(kv.split("=", 1) for kv in l.split()[1:]) for l in lines]
    return {r["engine"]: r for r in rows}


@pytest.mark.slow
def test_benchmark_runs_all_three_generators_on_the_same_weights(tmp_path, capsys):
    main(["--device", "cpu", "--preset", "tiny", "--num-prompts", "3", "--min-len", "4", "--max-len", "12",
          "--new-tokens", "3", "--out", str(tmp_path)])
    rows = parse(capsys.readouterr().out)
    assert list(rows) == ["hf", "naive", "paged"]
    for r in rows.values():
        assert int(r["output_tokens"]) == 9 and float(r["tok_per_s"]) > 0 and 0 < float(r["kv_util"]) <= 1
    assert rows["paged"]["same_tokens_as_naive"] == "1.000", "fp32 on a CPU: the paged engine must agree exactly"
    assert int(rows["paged"]["prefill_tokens"]) < int(rows["naive"]["prefill_tokens"]), "no padding in the paged prefill"
    assert {"results.json", "kv_utilisation.png", "throughput.png"} <= {p.name for p in tmp_path.iterdir()}


def test_shared_prefix_is_computed_once_with_prefix_caching(capsys):
    main(["--device", "cpu", "--preset", "tiny", "--num-prompts", "4", "--min-len", "4", "--max-len", "12",
          "--new-tokens", "2", "--shared-prefix", "32"])
    rows = parse(capsys.readouterr().out)
    saved = int(rows["paged-nocache"]["prefill_tokens"]) - int(rows["paged"]["prefill_tokens"])
    assert saved == int(rows["paged"]["cached_prompt_tokens"]) == 3 * 32  # the first prompt computes it
