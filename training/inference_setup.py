"""What the inference commands share that needs the tokenizer, the chat formats or LoRA, all of which
live in training/: `python -m inference.generate`, `python -m inference.serve`, `python -m inference.chat`
and the serving benchmark load a checkpoint here and turn text into prompt ids (and ids back into
text) through one `TextCodec`, so that a server's greedy answer is byte for byte what `generate` prints.

- `load_checkpoint`: a model and its tokenizer from a zoo or Hugging Face-format folder, or a base with a
  LoRA adapter merged in;
- `chat_for` (generate's --chat / --no-chat) and `served_chat_format` (a server's chat endpoint): the chat
  format of training/chat.py to ask the model in;
- `TextCodec`: a plain prompt's ids (with the bos a published model was trained with), a conversation's
  ids, the ids that end an answer, the ids never shown as text, and decoding;
- `numbered_tokenizer`: a tokenizer for a randomly initialised model of any vocabulary (token i is the
  word "w<i>"), so that a server can run on a shape no trained tokenizer exists for (benchmarks);
- `server_app`: the OpenAI-compatible app of inference/server.py for a loaded model, on a new engine.
"""

from __future__ import annotations

from pathlib import Path

import tokenizers
from safetensors import safe_open

from architectures import registry
from inference.engine import EngineConfig, LLMEngine
from inference.engine_loop import EngineLoop
from inference.server import create_app
from inference.checkpoint_files import TOKENIZER_FILE, adapter_base, check_adapter, check_checkpoint, recorded_chat_format
from inference.sampling import eos_ids
from training.chat import ChatFormat, chat_format
from training.lora import load_adapter, merge
from training.lora.lora import find_targets
from training.lora.peft_format import PREFIX, WEIGHTS_FILE, expected_shapes, read_adapter_config
from training.tokenizer import SPECIAL_TOKENS, Tokenizer

# ---- loading ------------------------------------------------------------------------------------------


def load_checkpoint(checkpoint: str | Path | None, adapter: str | Path | None, device, dtype) -> tuple:
    """(model, tokenizer, the folders they came from): the checkpoint, or the base with `adapter` merged in
    (the base is `checkpoint`, else the folder the adapter records)."""
    adapter = check_adapter(adapter) if adapter else None
    base = Path(checkpoint) if checkpoint else adapter_base(adapter)
    own_tokenizer = adapter is not None and (adapter / TOKENIZER_FILE).is_file()
    check_checkpoint(base, "--checkpoint" if checkpoint else f"--adapter {adapter}'s base",
                     why_tokenizer=None if own_tokenizer else "generation needs the checkpoint's tokenizer",
                     adapter_hint="pass it as --adapter DIR (with its base model as --checkpoint DIR if it records none)")
    tokenizer = Tokenizer.from_file((adapter if own_tokenizer else base) / TOKENIZER_FILE)
    if adapter is None:
        return registry.from_pretrained(base, dtype=dtype, device=device), tokenizer, [base]
    model = registry.from_pretrained(base, device=device)  # fp32: the adapter is merged at full precision
    check_adapter_fits(model, adapter, base)
    merge(load_adapter(model, adapter))
    return model.to(dtype), tokenizer, [base, adapter]


def check_adapter_fits(model, adapter: Path, base: Path) -> None:
    """The adapter's tensors must be those its target modules need on this base, of the same shapes: else one
    short line with the first difference and their count (load_adapter would list every tensor)."""
    config = read_adapter_config(adapter)
    shapes = {n.removeprefix(PREFIX): s for n, s in expected_shapes(model, find_targets(model, config), config).items()}
    try:
        with safe_open(str(adapter / WEIGHTS_FILE), framework="pt") as f:
            found = {k.removeprefix(PREFIX): tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception:  # missing, truncated or corrupt: load_adapter says which
        return
    diffs = ([f"{n} is not in the adapter" for n in shapes if n not in found]
             + [f"{n} adapts no module of the base" for n in found if n not in shapes]
             + [f"{n}: adapter {found[n]} vs base {s}" for n, s in shapes.items() if n in found and found[n] != s])
    if diffs:
        more = f" (and {len(diffs) - 1} more differences)" if len(diffs) > 1 else ""
        raise ValueError(f"--adapter {adapter} does not fit the base model {base}: {diffs[0]}{more}; pass the model it "
                         f"was trained on as --checkpoint")


# ---- the chat format -----------------------------------------------------------------------------------


def chat_for(chat: bool | None, tokenizer: Tokenizer, folders: list[Path]) -> ChatFormat | None:
    """The chat format to wrap a prompt in, or None for plain text: `chat` True / False as asked, None: on for
    the folders a chat method wrote (in the format that run used, if it named one)."""
    name = next(filter(None, (recorded_chat_format(f) for f in reversed(folders))), None)
    if not (chat if chat is not None else name is not None):
        return None
    return chat_format(tokenizer, name)


def served_chat_format(tokenizer: Tokenizer, folders: list[Path]) -> tuple[ChatFormat | None, str | None]:
    """(format, None) for the chat endpoint of a server: the format the training record names, else the one
    the tokenizer's vocabulary fits; (None, why) when no format fits this tokenizer."""
    try:
        return chat_for(True, tokenizer, folders), None
    except ValueError as e:
        return None, str(e)


def special_ids(tokenizer: Tokenizer) -> set[int]:
    """The ids of the tokenizer's special tokens (<|eos|>, <|user|>, ...): never shown as a chat reply."""
    return {i for i, t in tokenizer.backend.get_added_tokens_decoder().items() if t.special}


def fold_system_turns(messages: list[dict], roles: tuple[str, ...]) -> list[dict]:
    """`messages` for a format without a system role (the zoo's): each system turn's text goes in front of
    the next user turn, a blank line apart (as a new user turn if none follows). Unchanged otherwise."""
    if "system" in roles:
        return list(messages)
    out, pending = [], []
    for m in messages:
        if m["role"] == "system":
            pending.append(m["content"])
            continue
        if pending and m["role"] == "user":
            m, pending = {"role": "user", "content": "\n\n".join(pending + [m["content"]])}, []
        out.append(m)
    return out + ([{"role": "user", "content": "\n\n".join(pending)}] if pending else [])


# ---- text <-> ids --------------------------------------------------------------------------------------


class TextCodec:
    """A tokenizer with a model's end-of-text ids and (if any) a chat format: what turns a request's text into
    prompt ids and its tokens back into the text an answer shows, the same way for every command."""

    def __init__(self, tokenizer: Tokenizer, model_config, fmt: ChatFormat | None, no_chat_reason: str | None = None):
        self.tokenizer, self.fmt = tokenizer, fmt
        self.no_chat_reason = no_chat_reason or "this checkpoint has no chat format"
        ends = eos_ids(model_config.eos_token_id) | ({tokenizer.eos_id} if tokenizer.eos_id is not None else set())
        self.completion_stop_ids: set[int] = ends  # a plain continuation ends at the end of text
        self.completion_hidden: set[int] = ends  # and never shows it
        self.chat_stop_ids: set[int] = ends | set(fmt.stop_ids if fmt else ())  # a reply ends at its end of turn
        self.chat_hidden: set[int] = self.chat_stop_ids | special_ids(tokenizer)  # a reply shows no special token
        # Published models were trained with a leading bos, which a plain prompt then needs too.
        self.bos = [tokenizer.bos_id] if tokenizer.kind == "pretrained" and tokenizer.bos_id is not None else []

    def completion_prompt(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text)
        if not ids:
            raise ValueError("the prompt is empty: give some text to continue")
        return self.bos + ids

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        """The ids of a conversation, ending where the assistant's reply begins."""
        if self.fmt is None:
            raise ValueError(self.no_chat_reason)
        return self.fmt.prompt(fold_system_turns(messages, self.fmt.roles))

    @property
    def chat_begin_len(self) -> int:
        """Ids that open every conversation (kept in front when a long prompt is cropped)."""
        return len(self.fmt.begin()) if self.fmt is not None else 0

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)


def numbered_tokenizer(vocab_size: int) -> Tokenizer:
    """A tokenizer of exactly `vocab_size` ids for a randomly initialised model: the zoo's special tokens at
    ids 0..4, then token i is the word "w<i>", words decoded a space apart ("w17 w4 w250")."""
    if vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must exceed the {len(SPECIAL_TOKENS)} special tokens, got {vocab_size}")
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)} | {f"w{i}": i for i in range(len(SPECIAL_TOKENS), vocab_size)}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<|pad|>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return Tokenizer(backend)


def server_app(model, tokenizer: Tokenizer, folders: list[Path], model_name: str, engine_config: EngineConfig,
               api_key: str | None = None):
    """The server's FastAPI app for `model` on a new engine (its loop starts and stops with the app; the
    loop is `app.state.loop`, its engine `app.state.loop.engine`). Its chat endpoint asks in the format of
    `served_chat_format`, or answers 400 with the reason when none fits the tokenizer."""
    fmt, why_not = served_chat_format(tokenizer, folders)
    codec = TextCodec(tokenizer, model.config, fmt, why_not)
    return create_app(EngineLoop(LLMEngine(model, engine_config)), codec, model_name, api_key)
