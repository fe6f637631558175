"""The decode-latency script runs end to end on the CPU and measures what it says: the Mamba-2 cache keeps
the same bytes at every context while Llama 3's grows with it (the latency itself is timed on a GPU)."""

from architectures.mamba2_hybrid.benchmarks.decode_latency import main


def test_decode_latency_script_runs_and_only_the_attention_cache_grows(tmp_path):
    results = main(["--device", "cpu", "--size", "tiny", "--contexts", "16,64", "--batches", "1", "--steps", "1",
                    "--rounds", "1", "--out", str(tmp_path), "--figure", str(tmp_path / "latency.png")])
    assert (tmp_path / "results.json").exists() and (tmp_path / "latency.png").exists()
    mb = {(r["model"], r["context"]): r["cache_mb"] for r in results}
    assert mb["mamba2", 16] == mb["mamba2", 64], "a Mamba-2 layer's decoding state does not depend on the context"
    assert mb["llama3", 64] > mb["llama3", 16]
    assert all(r["ms_per_token"] > 0 for r in results)
