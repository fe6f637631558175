"""Sequence classification with the LSTM of cells.py: read a text character by character, predict a label.

    export ZOO_DATA_DIR=/work/shared/data                # where tinyshakespeare.txt is (else it is downloaded)
    python -m fundamentals.rnn.classify                  # who speaks? 5 speakers of Tiny Shakespeare, 2-core CPU
    python -m fundamentals.rnn.classify --cell torch     # the same model on nn.LSTM (same init, same math, fused)
    python -m fundamentals.rnn.classify --pool last      # classify the last state, not the mean of the states
    python -m fundamentals.rnn.classify --task imdb      # IMDB sentiment through `datasets` (downloads ~130 MB)

The many-to-one use of an RNN: embed each character, run the LSTM (Hochreiter & Schmidhuber,
"Long Short-Term Memory", 1997) over the whole text, and feed one summary vector to a linear
layer over the K classes: the state after the last real character (`pool last`) or the mean
of the states over the characters (`pool mean`, the default).

Tasks:
- `speaker` (offline): Tiny Shakespeare through training.data's `get_corpus`. A turn is
  "NAME:\\n" followed by its lines up to a blank line (`speaker_turns`); the speech of each turn
  of the K most frequent speakers is labelled with its speaker. The split (`split_turns`) is by
  turn, stratified: each speaker's turns are shuffled with `seed` and `test_fraction` of them are
  held out, so no turn is on both sides, but turns of one scene are: the corpus has no scene
  markers, and every speaker lives in one or two plays, so a split by position would put whole
  speakers on one side. The test therefore asks "who, of speakers met in these plays, says
  this?", helped by the play's names and topics, not "who speaks in an unseen play?".
- `imdb`: sentiment (0 neg, 1 pos) of movie reviews (Maas et al., "Learning Word Vectors for
  Sentiment Analysis", 2011) through Hugging Face `datasets`: the hub's `stanfordnlp/imdb`
  (25,000 train, 25,000 test reviews, columns `text` and `label`), or a local folder of files in
  that layout (`load_labelled_texts`). Not run in this repository: it is tested on small parquet
  and JSON files that tests/fundamentals/test_classify.py writes.

Each text is cut to its first `max_chars` characters. Batches pad on the right, so the LSTM's
final state has read the padding too: the classifier takes the output at each text's own last
position instead, and masks the padding out of the mean (`test_padding_does_not_change_a_texts_logits`).
The figure is test accuracy, beside the majority baseline: the share of test texts in the most
frequent training class, which a classifier that ignores its input reaches.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from architectures.utils.command_line import command_line
from fundamentals.cli import AT_LEAST_0, AT_LEAST_1, Range, parse_config
from fundamentals.common import Stopwatch, report
from fundamentals.optim import warmup_cosine
from fundamentals.rnn.cells import make_lstm
from training.data import cache_dir, get_corpus

IMDB_HUB_NAME = "stanfordnlp/imdb"
TEXT_COLUMN, LABEL_COLUMN = "text", "label"
PAD, UNKNOWN = 0, 1  # ids 0 and 1; the characters of the training texts follow


@dataclass
class ClassifyConfig:
    RANGES: ClassVar = {"speakers": Range(2), "test_fraction": Range(0, 1, low_open=True, high_open=True),
                        "limit": AT_LEAST_0, "max_chars": AT_LEAST_1}
    CHOICES: ClassVar = {"task": ("speaker", "imdb"), "cell": ("ours", "torch"), "pool": ("last", "mean")}

    task: str = "speaker"  # "speaker" (Tiny Shakespeare, offline) or "imdb" (sentiment, through `datasets`)
    data: str = ""  # "": the task's own (tinyshakespeare / stanfordnlp/imdb); else a .txt file / a folder of files
    speakers: int = 5  # speaker task: the K most frequent speakers are the classes
    test_fraction: float = 0.2  # speaker task: share of each speaker's turns held out (imdb has its own test split)
    limit: int = 0  # imdb: at most this many train and this many test texts, drawn at random; 0: all
    max_chars: int = 256  # each text is cut to its first max_chars characters (time steps of the LSTM)
    cell: str = "ours"  # "ours" (cells.py, a Python loop over time) or "torch" (nn.LSTM, same math, fused)
    # "mean": the mean of the outputs over the text's characters; "last": the output at its last character.
    # Mean by default: on the speaker task "last" fit the training turns and stayed near the baseline
    # on the test turns (notes/fundamentals.md)
    pool: str = "mean"  # "mean" or "last": what the linear layer reads
    embed: int = 32  # character embedding width
    hidden: int = 64  # LSTM hidden size H
    layers: int = 1  # stacked LSTM layers
    batch_size: int = 32  # texts per step
    epochs: int = 12  # passes over the training texts
    lr: float = 1e-2  # AdamW peak, warm-up then cosine down to lr/10
    warmup_steps: int = 20  # linear warm-up, then cosine to lr/10
    weight_decay: float = 0.01  # a few hundred texts per class: some regularisation against memorising them
    grad_clip: float = 1.0  # clip the global gradient norm: recurrent gradients can spike
    seed: int = 0  # the split, the initial weights and the batch order
    threads: int = 1  # small matrices on a shared 2-core machine: one thread (see fundamentals/nn/train.py)


PRESETS = {
    "default": ClassifyConfig(),
    "tiny": ClassifyConfig(max_chars=24, embed=8, hidden=16, batch_size=8, epochs=2, warmup_steps=2),
}


# ---------------------------------------------------------------------------- data


def speaker_turns(text: str) -> list[tuple[str, str]]:
    """[(speaker, speech), ...] in corpus order, from blocks of "NAME:\\n" + lines, separated by blank lines.

    A header with no lines after it (Tiny Shakespeare has 125, where a speech was cut) is dropped.
    """
    turns = []
    for block in re.split(r"\n\s*\n", text):
        header, _, speech = block.strip("\n").partition("\n")
        if header.endswith(":") and speech.strip():
            turns.append((header[:-1].strip(), speech))
    return turns


def split_turns(turns: list[tuple[str, str]], k: int, test_fraction: float, seed: int):
    """(train, test, speakers): train and test are lists of (turn index, speech, class id) of the k most
    frequent speakers; each speaker's turns are shuffled and round(test_fraction * n) of them held out."""
    counts = Counter(speaker for speaker, _ in turns)
    if len(counts) < k:
        raise ValueError(f"the corpus has {len(counts)} speakers, fewer than --speakers {k}")
    speakers = [name for name, _ in counts.most_common(k)]  # ties keep the order of first appearance
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for label, name in enumerate(speakers):
        mine = [i for i, (speaker, _) in enumerate(turns) if speaker == name]
        n_test = round(test_fraction * len(mine))
        if not 0 < n_test < len(mine):
            raise ValueError(f"speaker {name!r} has {len(mine)} turns: --test-fraction {test_fraction} leaves "
                             f"{n_test} for the test and {len(mine) - n_test} for training; both need at least one")
        order = torch.randperm(len(mine), generator=g).tolist()
        for rank, j in enumerate(order):
            i = mine[j]
            (test if rank < n_test else train).append((i, turns[i][1], label))
    return sorted(train), sorted(test), speakers


def load_labelled_texts(source: str = IMDB_HUB_NAME, split: str = "train", limit: int = 0, seed: int = 0,
                        cache: str | None = None) -> tuple[list[str], list[int], list[str] | None]:
    """(texts, labels, class names or None) of a split with columns `text` and `label` (IMDB's layout).

    source: a hub dataset name, or a local .parquet / .json / .jsonl file (read as the split), or a
    folder whose files of that split are named split*.parquet / .json / .jsonl (as in the hub's
    `plain_text/train-00000-of-00001.parquet`). limit > 0 keeps a random `limit` rows: the hub's
    IMDB splits are sorted by label, so their first rows are all negative.
    """
    import datasets

    cache = cache or str(cache_dir() / "datasets")
    path = Path(source).expanduser()
    if path.exists():
        files = [path] if path.is_file() else sorted(p for p in path.rglob(f"{split}*")
                                                     if p.suffix in (".parquet", ".json", ".jsonl"))
        if not files:
            found = sorted(p.name for p in path.rglob("*") if p.is_file())
            raise FileNotFoundError(f"{path} has no {split}*.parquet / .json / .jsonl file for split {split!r}; "
                                    f"it holds {found[:10]}")
        builder = "json" if files[0].suffix in (".json", ".jsonl") else "parquet"
        ds = datasets.load_dataset(builder, data_files={split: [str(f) for f in files]}, split=split, cache_dir=cache)
    elif source.startswith((".", "/", "~")) or path.suffix in (".parquet", ".json", ".jsonl"):
        raise FileNotFoundError(f"{path} does not exist; pass an existing file or folder, or a hub name such as "
                                f"{IMDB_HUB_NAME!r}")
    else:
        try:
            ds = datasets.load_dataset(source, split=split, cache_dir=cache)
        except Exception as e:  # no internet, a typo in the name, a split that does not exist
            raise FileNotFoundError(f"could not load {source!r} (split {split!r}) from the Hugging Face hub: "
                                    f"{type(e).__name__}: {e}; pass a local folder of parquet/JSON files instead") from e
    if TEXT_COLUMN not in ds.column_names or LABEL_COLUMN not in ds.column_names:
        raise ValueError(f"{source} (split {split!r}) has columns {ds.column_names}; a labelled text set needs "
                         f"a {TEXT_COLUMN!r} column (the text) and a {LABEL_COLUMN!r} column (an integer class id)")
    if limit:
        ds = ds.shuffle(seed=seed).select(range(min(limit, len(ds))))
    texts, labels = list(ds[TEXT_COLUMN]), [int(y) for y in ds[LABEL_COLUMN]]
    if labels and min(labels) < 0:
        raise ValueError(f"{source} (split {split!r}) has label {min(labels)}: unlabelled rows (IMDB's "
                         f"'unsupervised' split uses -1) cannot train a classifier")
    feature = ds.features[LABEL_COLUMN]
    return texts, labels, list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


class CharVocab:
    """Characters to ids: 0 pads, 1 stands for a character the training texts never had."""

    def __init__(self, texts: list[str]):
        self.chars = sorted(set("".join(texts)))
        self.stoi = {ch: i + 2 for i, ch in enumerate(self.chars)}

    def __len__(self) -> int:
        return len(self.chars) + 2

    def encode(self, text: str, max_chars: int) -> list[int]:
        return [self.stoi.get(ch, UNKNOWN) for ch in text[:max_chars]] or [UNKNOWN]  # an empty text reads one step


def pad(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (B, T) with T the longest length, and the lengths (B,)."""
    lengths = torch.tensor([len(s) for s in seqs])
    ids = torch.full((len(seqs), int(lengths.max())), PAD, dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, :len(s)] = torch.tensor(s)
    return ids, lengths


def length_batches(lengths: list[int], batch_size: int, g: torch.Generator | None) -> list[list[int]]:
    """Index batches of texts of similar length, so little of each batch is padding.

    With a generator (training): shuffle, sort pools of 16 batches by length, cut them into batches,
    and shuffle the batches. Without (evaluation): all texts sorted by length. The written-out LSTM
    pays one Python step per time step of the longest text of a batch, padding included.
    """
    order = torch.randperm(len(lengths), generator=g).tolist() if g is not None else list(range(len(lengths)))
    pool = 16 * batch_size if g is not None else len(lengths)
    batches = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start:start + pool], key=lambda i: lengths[i])
        batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    if g is not None:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
    return batches


# ---------------------------------------------------------------------------- model


class SequenceClassifier(nn.Module):
    def __init__(self, vocab_size: int, n_classes: int, cfg: ClassifyConfig):
        super().__init__()
        if cfg.pool not in ("last", "mean"):
            raise ValueError(f"--pool {cfg.pool!r} is not one of 'last', 'mean'")
        self.pool = cfg.pool
        self.embed = nn.Embedding(vocab_size, cfg.embed)
        self.lstm = make_lstm(cfg.cell, cfg.embed, cfg.hidden, cfg.layers)
        self.head = nn.Linear(cfg.hidden, n_classes)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """ids (B, T) right-padded, lengths (B,) -> class logits (B, K)."""
        out, _ = self.lstm(self.embed(ids))  # (B, T, H): the last layer's h_t at every step
        if self.pool == "last":
            # h at each text's own last character; the final state h_n would have read the padding.
            summary = out[torch.arange(len(ids)), lengths - 1]  # (B, H)
        else:
            mask = (torch.arange(ids.shape[1]) < lengths[:, None]).unsqueeze(-1)  # (B, T, 1): True on real characters
            summary = (out * mask).sum(1) / lengths[:, None]  # (B, H)
        return self.head(summary)  # (B, K)


@torch.no_grad()
def predict(model: SequenceClassifier, encoded: list[list[int]], batch_size: int) -> torch.Tensor:
    """The predicted class of every text, (N,)."""
    model.eval()
    preds = torch.empty(len(encoded), dtype=torch.long)
    for batch in length_batches([len(s) for s in encoded], batch_size, None):
        ids, lengths = pad([encoded[i] for i in batch])
        preds[batch] = model(ids, lengths).argmax(-1)
    model.train()
    return preds


def load_task(cfg: ClassifyConfig):
    """(train texts, train labels, test texts, test labels, class names, a description of the data)."""
    if cfg.task == "speaker":
        corpus = get_corpus(cfg.data or "tinyshakespeare")
        turns = speaker_turns(corpus.text)
        train, test, speakers = split_turns(turns, cfg.speakers, cfg.test_fraction, cfg.seed)
        about = (f"{corpus.name} ({corpus.origin}): {len(turns):,} turns, the {cfg.speakers} most frequent speakers' "
                 f"{len(train) + len(test):,} split by turn")
        return ([s for _, s, _ in train], [y for _, _, y in train], [s for _, s, _ in test], [y for _, _, y in test],
                speakers, about)
    if cfg.task == "imdb":
        source = cfg.data or IMDB_HUB_NAME
        if Path(source).expanduser().is_file():
            raise ValueError(f"--data {source} is one file; --task imdb needs a hub name or a folder holding "
                             f"train* and test* files, as the hub lays out {IMDB_HUB_NAME}")
        x_tr, y_tr, names = load_labelled_texts(source, "train", cfg.limit, cfg.seed)
        x_te, y_te, _ = load_labelled_texts(source, "test", cfg.limit, cfg.seed)
        names = names or [str(c) for c in range(max(y_tr + y_te) + 1)]
        return x_tr, y_tr, x_te, y_te, names, f"{source}: its train and test splits"
    raise ValueError(f"--task {cfg.task!r} is not one of 'speaker', 'imdb'")


@command_line
def main(argv=None) -> dict:
    cfg, out = parse_config(argv, PRESETS, "python -m fundamentals.rnn.classify", __doc__)
    torch.set_num_threads(cfg.threads)
    clock = Stopwatch()
    x_tr, y_tr, x_te, y_te, classes, about = load_task(cfg)
    vocab = CharVocab(x_tr)
    enc_tr = [vocab.encode(t, cfg.max_chars) for t in x_tr]
    enc_te = [vocab.encode(t, cfg.max_chars) for t in x_te]
    y_train, y_test = torch.tensor(y_tr), torch.tensor(y_te)
    majority = Counter(y_tr).most_common(1)[0][0]
    baseline = (y_test == majority).float().mean().item()
    print(f"{about}: {len(x_tr):,} train / {len(x_te):,} test texts, classes {classes}, vocabulary {len(vocab)}, "
          f"majority class {classes[majority]!r} ({baseline:.2%} of the test texts)", flush=True)

    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    model = SequenceClassifier(len(vocab), len(classes), cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = cfg.epochs * -(-len(x_tr) // cfg.batch_size)
    step = 0
    for epoch in range(cfg.epochs):
        loss_sum = 0.0
        for batch in length_batches([len(s) for s in enc_tr], cfg.batch_size, g):
            ids, lengths = pad([enc_tr[i] for i in batch])  # (B, T), (B,)
            loss = F.cross_entropy(model(ids, lengths), y_train[batch])
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            for group in opt.param_groups:
                group["lr"] = warmup_cosine(step, cfg.lr, cfg.lr / 10, cfg.warmup_steps, total)
            opt.step()
            loss_sum += loss.item() * len(batch)
            step += 1
        print(f"epoch {epoch}: train loss {loss_sum / len(x_tr):.4f} ({clock():.0f} s)", flush=True)

    test_acc = (predict(model, enc_te, 4 * cfg.batch_size) == y_test).float().mean().item()
    train_acc = (predict(model, enc_tr, 4 * cfg.batch_size) == y_train).float().mean().item()
    result = {"task": cfg.task, "data": about, "classes": classes, "train_texts": len(x_tr), "test_texts": len(x_te),
              "test_accuracy": round(test_acc, 4), "majority_baseline": round(baseline, 4),
              "train_accuracy": round(train_acc, 4), "parameters": sum(p.numel() for p in model.parameters()),
              "seconds": clock(), "config": asdict(cfg)}
    report(out, result)
    return result


if __name__ == "__main__":
    main()
