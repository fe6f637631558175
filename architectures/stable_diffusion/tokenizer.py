"""CLIP's tokenizer, read from (and written to) a pipeline's `tokenizer/` folder.

The zoo's language-model tokenizer (training/tokenizer.py) sits in a higher layer and is a
different scheme, so this family brings its own, built on the `tokenizers` library, as CLIP
defines it: lower-cased, whitespace-collapsed text, split into words, numbers and punctuation,
byte-level BPE whose word-final pieces end in "</w>", and `<|startoftext|>` ... `<|endoftext|>`
around every prompt. The vocabulary and merges come from `tokenizer.json` when the folder has one
(what transformers 5 writes), else from `vocab.json` + `merges.txt` (the published SD 1.x layout);
`tokenizer_config.json` gives the context (`model_max_length`) and the padding token.

    tokenizer(prompts) -> input ids, padded to the context     list of B strings -> (B, context)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

from architectures.utils.files import atomic_write, atomic_write_json

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# CLIP's pre-tokenizer: the special tokens, English contractions, runs of letters, single digits,
# runs of other non-space characters; everything else (spaces) is dropped.
SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def clip_pipeline(tok: Tokenizer) -> Tokenizer:
    """Put CLIP's normalizer and pre-tokenizer on a BPE tokenizer (its model set)."""
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(SPLIT), behavior="removed", invert=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def special_name(value) -> str | None:
    """A special token as tokenizer_config.json spells it: a string or {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


class CLIPTokenizer:
    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], model_max_length: int = 77,
                 pad_token: str = EOS):
        for name in (BOS, EOS, pad_token):
            if name not in vocab:
                raise ValueError(f"the tokenizer's vocabulary has no {name!r}, which CLIP's tokenizer needs")
        self.vocab, self.merges = vocab, [tuple(m) for m in merges]
        self.model_max_length, self.pad_token = model_max_length, pad_token
        self.bos_token_id, self.eos_token_id, self.pad_token_id = vocab[BOS], vocab[EOS], vocab[pad_token]
        tok = Tokenizer(BPE(vocab=vocab, merges=self.merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
                            unk_token=EOS, fuse_unk=False))
        self.backend = clip_pipeline(tok)
        self.backend.post_processor = processors.RobertaProcessing((EOS, self.eos_token_id), (BOS, self.bos_token_id),
                                                                   trim_offsets=False, add_prefix_space=False)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, prompt: str) -> list[int]:
        """One prompt -> its ids, start and end tokens included, unpadded."""
        if not isinstance(prompt, str):
            raise ValueError(f"a prompt must be a string, got {type(prompt).__name__} {prompt!r}")
        return self.backend.encode(prompt).ids

    def __call__(self, prompts: list[str] | str, context: int | None = None) -> torch.Tensor:
        """Prompts -> (B, context) ids padded with the padding token. A prompt longer than the context is
        refused (the reference pipeline would silently cut it)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        context = context or self.model_max_length
        rows = []
        for prompt in prompts:
            ids = self.encode(prompt)
            if len(ids) > context:
                raise ValueError(f"the prompt {prompt!r} is {len(ids)} tokens with its start and end tokens, longer than "
                                 f"the text encoder's context of {context}; shorten it")
            rows.append(ids + [self.pad_token_id] * (context - len(ids)))
        return torch.tensor(rows, dtype=torch.long)

    def decode(self, ids: list[int]) -> str:
        keep = [i for i in ids if i not in (self.bos_token_id, self.eos_token_id, self.pad_token_id)]
        return self.backend.decode(keep).replace("</w>", " ").strip()

    def save_pretrained(self, path: str | Path) -> None:
        """vocab.json, merges.txt (the published layout), tokenizer.json and tokenizer_config.json."""
        path = Path(path)
        atomic_write_json(path / "vocab.json", self.vocab)
        merges = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self.merges)
        atomic_write(path / "merges.txt", lambda tmp: Path(tmp).write_text(merges, encoding="utf-8"))
        atomic_write(path / "tokenizer.json", lambda tmp: self.backend.save(tmp))
        atomic_write_json(path / "tokenizer_config.json", {
            "tokenizer_class": "CLIPTokenizer", "model_max_length": self.model_max_length, "bos_token": BOS,
            "eos_token": EOS, "unk_token": EOS, "pad_token": self.pad_token})


def from_pretrained(path: str | Path) -> CLIPTokenizer:
    path = Path(path)
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    if (path / "tokenizer.json").is_file():
        model = json.loads((path / "tokenizer.json").read_text())["model"]
        vocab, merges = model["vocab"], [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
    elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        vocab = json.loads((path / "vocab.json").read_text(encoding="utf-8"))
        lines = (path / "merges.txt").read_text(encoding="utf-8").splitlines()
        merges = [line.split(" ") for line in lines if line and not line.startswith("#version")]
    else:
        found = sorted(p.name for p in path.iterdir()) if path.is_dir() else "nothing: it is not a directory"
        raise FileNotFoundError(f"{path} holds no CLIP tokenizer: it needs tokenizer.json, or vocab.json and merges.txt "
                                f"(found {found})")
    max_length = config.get("model_max_length", 77)
    max_length = 77 if not isinstance(max_length, int) or max_length > 10**6 else max_length  # "unset" is 1e30
    return CLIPTokenizer(vocab, [tuple(m) for m in merges], max_length, special_name(config.get("pad_token")) or EOS)


def train_tokenizer(texts: list[str], vocab_size: int, model_max_length: int) -> CLIPTokenizer:
    """A CLIP tokenizer with merges learned from `texts` (the captions of a small training set)."""
    tok = clip_pipeline(Tokenizer(BPE(continuing_subword_prefix="", end_of_word_suffix="</w>", unk_token=EOS)))
    trainer = BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS], end_of_word_suffix="</w>",
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ") if isinstance(m, str) else m) for m in model["merges"]]
    # The trainer numbers tokens of equal rank in no fixed order; number them again, deterministically:
    # the special tokens, the single symbols sorted, then each merge's result in merge order.
    merged = [a + b for a, b in merges]
    singles = sorted(t for t in model["vocab"] if t not in (BOS, EOS) and t not in set(merged))
    order = [BOS, EOS] + singles + [t for i, t in enumerate(merged) if t not in merged[:i]]
    return CLIPTokenizer({t: i for i, t in enumerate(order)}, merges, model_max_length)
