"""The from-scratch BPE (training/bpe.py) against the `tokenizers` library: training and encoding time.

    python -m training.benchmarks.bpe --vocab-size 512

Trains both on Tiny Shakespeare's training split, as training/cli.py trains the zoo's tokenizer,
checks that they learned the same merges and give the validation split the same ids, and prints
one parseable line per vocabulary size: `bpe_benchmark key=value ...` (seconds; the fastest of
`--repeats` runs of each).
"""

from __future__ import annotations

import time

from architectures.utils.command_line import ArgumentParser, UserRuntimeError, command_line
from training.bpe import BytePairEncoding, train_bpe
from training.data import load_corpus, split_text
from training.tokenizer import MIN_BPE_VOCAB, SPECIAL_TOKENS, Tokenizer


def fastest(repeats: int, fn):
    """(result, seconds) of the fastest of `repeats` calls of fn()."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return result, best


def measure(train: str, val: str, vocab_size: int, repeats: int) -> dict:
    library, library_train = fastest(repeats, lambda: Tokenizer.train(train, vocab_size))
    ours, ours_train = fastest(repeats, lambda: train_bpe(train, vocab_size, SPECIAL_TOKENS))
    library_ids, library_encode = fastest(repeats, lambda: library.encode(val))
    # A fresh model each time: ours caches each distinct word's ids, which would flatter a second run.
    ours_ids, ours_encode = fastest(repeats, lambda: BytePairEncoding(
        ours.vocab, ours.merges, ours.special_tokens).encode(val))
    if ours_ids != library_ids:
        raise UserRuntimeError(f"the two tokenizers disagree on the validation split at vocab_size={vocab_size}")
    return {"vocab_size": vocab_size, "merges": len(ours.merges), "train_chars": len(train),
            "val_tokens": len(ours_ids), "train_s_ours": round(ours_train, 3),
            "train_s_tokenizers": round(library_train, 3), "encode_s_ours": round(ours_encode, 3),
            "encode_s_tokenizers": round(library_encode, 3)}


@command_line
def main(argv=None) -> list[dict]:
    p = ArgumentParser(prog="python -m training.benchmarks.bpe", description=__doc__.split("\n")[0])
    p.add_argument("--vocab-size", type=int, nargs="+", default=[512, 2048],
                   help="vocabulary sizes to train, special tokens included (the presets use 512, 2048, 8192)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each measurement; the fastest is reported")
    args = p.parse_args(argv)
    if min(args.vocab_size) < MIN_BPE_VOCAB:
        p.error(f"--vocab-size must be >= {MIN_BPE_VOCAB} (the 256 bytes and the special tokens)")
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    train, val = split_text(load_corpus("tinyshakespeare"))
    rows = []
    for size in args.vocab_size:
        rows.append(measure(train, val, size, args.repeats))
        print("bpe_benchmark " + " ".join(f"{k}={v}" for k, v in rows[-1].items()), flush=True)
    return rows


if __name__ == "__main__":
    main()
