"""Checkpoints that real training runs wrote, shared by the inference command-line tests."""

import pytest

# A few steps of SFT on a handful of arithmetic conversations: seconds on a CPU, and every file the
# method writes (its training record in trainer_state.pt, summary.json) is the real thing.
SFT_TINY = ["--preset", "tiny", "--max-steps", "2", "--batch-size", "4", "--block-size", "64", "--eval-interval", "2",
            "--eval-batches", "1", "--arithmetic-examples", "40", "--speaker-examples", "0", "--eval-examples", "3",
            "--val-conversations", "8"]  # --block-size 64: below the base's max_position_embeddings (128)


@pytest.fixture(scope="session")
def sft_checkpoint(chat_base, tmp_path_factory):
    """What `python -m training.sft.train --base <the tiny chat_base>` writes, two steps of it."""
    from training.sft.train import main

    out = tmp_path_factory.mktemp("sft") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ZOO_CACHE_DIR", str(out.parent / "cache"))
        main(["--base", str(chat_base), "--out", str(out)] + SFT_TINY)
    return out
