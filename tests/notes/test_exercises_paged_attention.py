"""The answers to the exercises of notes/paged-attention.md, computed from the code and compared with the
hints the note gives."""

from architectures.common.cache import KVSpec
from inference.benchmarks.throughput import parse_args, workload
from inference.memory import paged_kv_bytes
from inference.step_metadata import ScheduledSeq, StepMetadata, host_metadata


def test_the_slot_of_one_token(hints):
    # one sequence of 40 tokens whose table is [7, 2, 9], blocks of 16: a prefill of all 40
    flat, shapes = host_metadata([ScheduledSeq(block_table=[7, 2, 9], start=0, end=40)], list(range(40)), 16,
                                 scratch_block=100)
    meta = StepMetadata.from_flat(flat, shapes)
    assert meta.slot_mapping[35].item() == 9 * 16 + 35 % 16 == 147
    assert meta.slot_mapping[16].item() == 2 * 16 == 32
    assert "9 x 16 + 3 = 147" in hints("paged-attention") and "2 x 16 + 0 = 32" in hints("paged-attention")


def test_blocks_and_waste_of_the_default_workload(hints):
    args, _ = parse_args([])
    prompts, new_tokens = workload(args, 128256)
    # at the end of the run each sequence holds its prompt and 255 generated tokens' K/V (the last is never stored)
    lengths = [len(p) + n - 1 for p, n in zip(prompts, new_tokens)]
    blocks = sum(-(-n // 16) for n in lengths)
    slots = 16 * blocks
    assert (sum(lengths), blocks, slots) == (32721, 2077, 33232)
    assert f"{sum(lengths) / slots:.1%}" == "98.5%"
    assert "2,077 blocks, 33,232 slots for 32,721 tokens: 98.5%" in hints("paged-attention")


def test_gemma_3_1b_like_sliding_window_bytes(hints):
    local, glob = KVSpec(1, 256, window=512), KVSpec(1, 256)  # one KV head of 256, bf16: 1,024 bytes a token
    windowed = paged_kv_bytes([glob] * 4 + [local] * 22, [32768], 16, 2)
    everything = paged_kv_bytes([glob] * 26, [32768], 16, 2)
    assert windowed == 4 * 32768 * 1024 + 22 * 512 * 1024 == 145_752_064
    assert everything == 872_415_232 and round(everything / windowed, 1) == 6.0
    assert "145,752,064 bytes against 872,415,232, 6.0x" in hints("paged-attention")
