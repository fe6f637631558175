"""The answers to the exercises of notes/mamba2.md, computed from the code and compared with the hints
the note gives."""

from architectures.common.cache import bytes_per_sequence
from architectures.llama3 import preset as llama_preset
from architectures.mamba2_hybrid import preset
from architectures.mamba2_hybrid.benchmarks.decode_latency import SIZES
from architectures.mamba2_hybrid.config import Mamba2HybridConfig
from inference.memory import cache_specs
from inference.memory import main as memory_main


def test_state_of_mamba2_2_7b_and_where_a_kv_cache_passes_it(hints):
    state = bytes_per_sequence(cache_specs("mamba2_hybrid", preset("mamba2-2.7b")), 2)
    assert state == 64 * (21_504 + 655_360) * 2 == 86_638_592
    assert memory_main(["--family", "mamba2_hybrid", "--preset", "mamba2-2.7b"])["bytes_per_sequence"] == state
    kv = memory_main(["--preset", "llama-3.2-1b"])["bytes_per_token"]
    assert kv == 32_768 and state / kv == 2_644
    assert f"{state / 2**20:.1f} MiB" == "82.6 MiB"
    assert "86,638,592 bytes, 82.6 MiB; exactly 2,644 tokens" in hints("mamba2")


def test_state_of_the_decode_latency_model_at_batch_16(hints):
    state = bytes_per_sequence(cache_specs("mamba2_hybrid", Mamba2HybridConfig(**SIZES["130m"]["mamba"])), 2)
    assert state == 24 * (1_792 * 4 + 24 * 64 * 128) * 2 == 9_781_248
    assert f"{16 * state / 1e6:.1f} MB" == "156.5 MB"
    assert "9,781,248 bytes per sequence; x 16 = 156.5 MB" in hints("mamba2")
