"""Conversations as token ids: the chat formats, and loaders for the datasets people have.

A conversation is a list of turns, `{"role": "user" | "assistant" | "system", "content": str}`,
the `messages` layout of the hub's chat datasets. A `ChatFormat` renders it into token ids
plus a mask saying which ids are the assistant's (what SFT learns; everything else is
context), and renders a prompt that ends where the assistant's reply begins (what generation
continues). Two formats, picked from the tokenizer's vocabulary by `chat_format`:

- `ZooChat`, for the zoo's own tokenizers, which reserve <|bos|>, <|eos|>, <|user|> and
  <|assistant|> (training/tokenizer.py) so that a model pretrained on plain text can be
  fine-tuned to chat without growing its vocabulary:

      <|bos|> <|user|> What is 12 + 30? <|eos|> <|assistant|> 42 <|eos|>
                                                              ^^^^^^^^^ trained

- `Llama3Chat`, the format Meta's Llama 3 instruct checkpoints were trained on, as their
  published chat template renders it:

      <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\nWhat is 12 + 30?<|eot_id|>
      <|start_header_id|>assistant<|end_header_id|>\\n\\n42<|eot_id|>
                                                        ^^^^^^^^^^^ trained

Special tokens are placed by id and the text between them is encoded on its own, which is what
encoding the rendered string whole gives (a special token always splits the text around it);
tests/training/test_chat.py checks `Llama3Chat` against transformers' `apply_chat_template`.

`load_conversations` reads the formats in common use, from a local .json/.jsonl file or a hub
dataset name through `datasets`: a `messages` column (role/content turns), ShareGPT's
`conversations` (from/value), or Alpaca's instruction/input/output.
"""

from __future__ import annotations

from training.datafiles import local_or_hub_records
from training.tokenizer import Tokenizer

Message = dict  # {"role": str, "content": str}


def check_conversation(messages, roles: tuple[str, ...], where: str = "conversation") -> None:
    """A list of {"role", "content"} turns with known roles and at least one assistant turn."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"{where} must be a non-empty list of {{'role': ..., 'content': ...}} turns, got {messages!r:.80}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"{where}, turn {i}: expected a dict with 'role' and 'content', got {m!r:.80}")
        if m["role"] not in roles:
            raise ValueError(f"{where}, turn {i}: role {m['role']!r} is not one this chat format knows "
                             f"({', '.join(roles)}); rename it or drop the turn")
        if not isinstance(m["content"], str):
            raise ValueError(f"{where}, turn {i}: content must be a string, got {type(m['content']).__name__}")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where} has no assistant turn, so supervised fine-tuning has nothing to learn from it; "
                         f"every conversation needs at least one turn with role 'assistant'")


class ChatFormat:
    """Renders conversations to ids. Subclasses define the tokens around each turn."""

    name = "?"
    roles: tuple[str, ...] = ()

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def _id(self, token: str) -> int:
        i = self.tokenizer.token_to_id(token)
        if i is None:
            raise ValueError(f"the {self.name} chat format needs the token {token!r}, which this tokenizer "
                             f"(vocabulary of {self.tokenizer.vocab_size}) does not have")
        return i

    def begin(self) -> list[int]:
        """Ids that open every conversation."""
        raise NotImplementedError

    def header(self, role: str) -> list[int]:
        """Ids before a turn's content (not trained)."""
        raise NotImplementedError

    def content(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def end(self) -> list[int]:
        """Ids that close a turn (trained after an assistant turn: that is how the model learns to stop)."""
        raise NotImplementedError

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Tokens at which generation of an assistant turn stops."""
        return tuple(self.end())

    def render(self, messages, where: str = "conversation") -> tuple[list[int], list[bool]]:
        """(ids, trained): the whole conversation, and for each id whether it is the assistant's
        (its content and the end-of-turn token), which is where SFT puts its loss."""
        check_conversation(messages, self.roles, where)
        ids, trained = list(self.begin()), [False] * len(self.begin())
        for m in messages:
            own = m["role"] == "assistant"
            head, body, tail = self.header(m["role"]), self.content(m["content"]), self.end()
            ids += head + body + tail
            trained += [False] * len(head) + [own] * (len(body) + len(tail))
        return ids, trained

    def prompt(self, messages) -> list[int]:
        """The ids of `messages` (no assistant turn needed) followed by the assistant's header:
        what a model continues to produce its reply."""
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError(f"a prompt must be a non-empty list of turns, got {messages!r:.80}")
        check_conversation(list(messages) + [{"role": "assistant", "content": ""}], self.roles, "prompt")
        ids = list(self.begin())
        for m in messages:
            ids += self.header(m["role"]) + self.content(m["content"]) + self.end()
        return ids + self.header("assistant")


class ZooChat(ChatFormat):
    """<|bos|> then, per turn, <|user|> or <|assistant|>, the text, <|eos|>."""

    name = "zoo"
    roles = ("user", "assistant")

    def begin(self) -> list[int]:
        return [self._id("<|bos|>")]

    def header(self, role: str) -> list[int]:
        return [self._id(f"<|{role}|>")]

    def end(self) -> list[int]:
        return [self._id("<|eos|>")]


class Llama3Chat(ChatFormat):
    """Llama 3 instruct: <|begin_of_text|>, then per turn <|start_header_id|>ROLE<|end_header_id|>,
    a blank line, the text with surrounding whitespace stripped, <|eot_id|>."""

    name = "llama3"
    roles = ("system", "user", "assistant", "ipython")

    def begin(self) -> list[int]:
        return [self._id("<|begin_of_text|>")]

    def header(self, role: str) -> list[int]:
        # The blank line after the header is part of it: the prompt ends there, and it is not trained.
        return ([self._id("<|start_header_id|>")] + self.tokenizer.encode(role) + [self._id("<|end_header_id|>")]
                + self.tokenizer.encode("\n\n"))

    def content(self, text: str) -> list[int]:
        # The template writes "\n\n" + content.strip() as one piece of text, so it is encoded as one
        # piece, and the ids of the blank line (already in the header) are split off its front.
        blank = self.tokenizer.encode("\n\n")
        ids = self.tokenizer.encode("\n\n" + text.strip())
        if ids[:len(blank)] != blank:
            raise ValueError(f"this tokenizer merges the blank line after a header into the text {text[:40]!r}, "
                             f"so the header and the content cannot be told apart")
        return ids[len(blank):]

    def end(self) -> list[int]:
        return [self._id("<|eot_id|>")]


FORMATS = {"zoo": ZooChat, "llama3": Llama3Chat}


def chat_format(tokenizer: Tokenizer, name: str | None = None) -> ChatFormat:
    """The format a tokenizer was made for: Llama 3's if it has its header tokens, the zoo's if it
    has the zoo's reserved tokens; `name` forces one."""
    if name is not None:
        if name not in FORMATS:
            raise ValueError(f"unknown chat format {name!r}; choose one of {sorted(FORMATS)}")
        return FORMATS[name](tokenizer)
    if tokenizer.token_to_id("<|start_header_id|>") is not None:
        return Llama3Chat(tokenizer)
    if all(tokenizer.token_to_id(t) is not None for t in ("<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>")):
        return ZooChat(tokenizer)
    raise ValueError(f"this tokenizer (vocabulary of {tokenizer.vocab_size}) has neither Llama 3's header tokens "
                     f"nor the zoo's <|user|>/<|assistant|>, so no chat format fits it; use a zoo tokenizer or a "
                     f"Llama 3 checkpoint's tokenizer.json")


# ---------------------------------------------------------------------------- loading datasets

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


CHAT_LAYOUTS = ("'messages' (a list of {'role', 'content'} turns), 'conversations' (ShareGPT's {'from', "
                "'value'} turns) or Alpaca's 'instruction' + 'output' (+ 'input') strings")


def to_messages(record: dict, where: str = "record") -> list[Message]:
    """One dataset record as a conversation: `messages`, ShareGPT `conversations`, or Alpaca."""
    if "messages" in record:
        return [{"role": m["role"], "content": m["content"]}
                for m in _turns(record["messages"], ("role", "content"), "messages", where)]
    if "conversations" in record:
        turns = []
        for m in _turns(record["conversations"], ("from", "value"), "conversations", where):
            if m["from"] not in SHAREGPT_ROLES:
                raise ValueError(f"{where}: ShareGPT role {m['from']!r} is not one of {sorted(SHAREGPT_ROLES)}")
            turns.append({"role": SHAREGPT_ROLES[m["from"]], "content": m["value"]})
        return turns
    if "instruction" in record and "output" in record:
        for key in ("instruction", "output", "input"):
            if record.get(key) is not None and not isinstance(record[key], str):
                raise ValueError(f"{where}: Alpaca's {key!r} must be a string, got a {type(record[key]).__name__}")
        question = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
        return [{"role": "user", "content": question}, {"role": "assistant", "content": record["output"]}]
    raise ValueError(f"{where} has columns {sorted(record)}; a chat dataset needs {CHAT_LAYOUTS}")


def _turns(value, keys: tuple[str, str], column: str, where: str) -> list[dict]:
    """A record's list of turns, each a dict whose two `keys` hold strings."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: {column!r} must be a non-empty list of {{{keys[0]!r}, {keys[1]!r}}} turns, got "
                         f"{value!r:.60}")
    for i, turn in enumerate(value):
        if not isinstance(turn, dict) or not all(isinstance(turn.get(k), str) for k in keys):
            raise ValueError(f"{where}: {column!r} turn {i} must be an object with {keys[0]!r} and {keys[1]!r} "
                             f"strings, got {turn!r:.60}")
    return value


def load_conversations(source: str, split: str = "train") -> list[list[Message]]:
    """Conversations from a local .json/.jsonl file (read and checked by training/datafiles.py) or
    a Hugging Face hub dataset, through `datasets`."""
    from training.data import cache_dir

    records = local_or_hub_records(source, split, "chat data", f"each with {CHAT_LAYOUTS}", cache_dir() / "datasets")
    conversations = []
    for where, record in records:
        conversations.append(to_messages(record, where))
        # Roles no format knows, and conversations without a reply, are refused here, where the file's
        # line is known; a role the base's format lacks (a system turn for the zoo's) when rendered.
        check_conversation(conversations[-1], tuple(dict.fromkeys(r for f in FORMATS.values() for r in f.roles)), where)
    return conversations
