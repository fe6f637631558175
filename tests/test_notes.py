"""Every file path and code symbol a note (or the README) names in backticks exists.

Notes are read side by side with the code, so a renamed function or moved file must break a
test, not silently mislead a reader. What counts as a reference:
- a path: contains "/" or ends in .py/.md (e.g. `training/trainer.py`, `tests/test_notes.py::name`);
- a symbol (defined, or a string constant, somewhere in the code): an identifier with an underscore, a capital after a lowercase letter, a dot
  between identifiers, or trailing "()" (e.g. `lm_loss`, `Llama3`, `TokenData.get_batch`).
Plain words (`tiny`), flags (`--resume`), shell commands and math are not checked, and
neither are names from other libraries (torch.*, transformers.*, ...).
"""

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = sorted((REPO / "notes").rglob("*.md")) + [REPO / "README.md"]  # lessons, lab records (notes/lab/), README
CODE_DIRS = ("architectures", "training", "inference", "fundamentals", "tests")
EXTERNAL = ("torch", "F", "nn", "np", "numpy", "transformers", "tokenizers", "datasets", "safetensors", "math",
            "einops", "matplotlib", "tqdm", "pytest", "hypothesis", "os", "sys", "json", "pydoc_data", "urllib",
            "dataclasses", "typing", "argparse", "functools", "itertools", "triton", "flex_attention")
FILE_SUFFIXES = (".json", ".safetensors", ".png", ".jsonl", ".txt", ".pt", ".bin", ".toml", ".yaml", ".csv")


def defined_names() -> set[str]:
    """Every name the code defines (`defined_in`), plus argument names, imported names and the words of its
    strings (config fields and dict keys a note may quote)."""
    names: set[str] = set()
    for d in CODE_DIRS:
        for f in (REPO / d).rglob("*.py"):
            if f.resolve() == Path(__file__).resolve():
                continue  # this file's own strings name things that must NOT exist
            names.add(f.stem)
            names |= defined_in(f)
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, ast.arg):
                    names.add(node.arg)
                elif isinstance(node, (ast.Import, ast.ImportFrom)):
                    names.update((a.asname or a.name).split(".")[-1] for a in node.names)
                elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                    # dict keys and config fields the code reads or writes: "val_nats_per_char", ...
                    names.update(re.findall(r"[A-Za-z_]\w*", node.value))
    return names


def references(text: str) -> list[str]:
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # code blocks are examples, not references
    return re.findall(r"`([^`\n]+)`", text)


def is_symbol(token: str) -> bool:
    core = token[:-2] if token.endswith("()") else token
    if not re.fullmatch(r"[A-Za-z_][\w.]*", core):
        return False
    return token.endswith("()") or "_" in core or "." in core or bool(re.search(r"[a-z][A-Z]|^[A-Z][a-z]+[A-Z0-9]", core))


def check(token: str, names: set[str]) -> str | None:
    token = token.strip()
    if token.startswith(("-", "python", "pip", "$")) or " " in token or "{" in token:
        return None  # flags, commands, and templates such as moe/l{l}/load
    if "/" in token or token.endswith((".py", ".md")):
        path = token.split("::")[0].split(":")[0].rstrip("/")
        if path.startswith(("http", "~", "../", "/", "$", "<")) or "*" in path or "<" in path:
            return None
        if path.startswith("runs/"):
            return None  # what a command wrote (every --out defaults under runs/, which git ignores)
        if "/" not in path:
            return None if any(REPO.rglob(path)) else f"file {path} not found anywhere in the repo"
        return None if (REPO / path).exists() else f"path {path} does not exist"
    if not is_symbol(token) or token.endswith(FILE_SUFFIXES):
        return None
    parts = (token[:-2] if token.endswith("()") else token).split(".")
    if parts[0] in EXTERNAL:
        return None
    if (REPO / Path(*parts)).with_suffix(".py").exists() or (REPO / Path(*parts)).is_dir():
        return None  # a module path such as training.trainer
    missing = [p for p in parts if p not in names and not p.isdigit()]
    return f"symbol {token}: {missing} not defined in the code" if missing else None


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(REPO)) for d in DOCS])
def test_every_backticked_path_and_symbol_exists(doc):
    names = defined_names()
    problems = [msg for tok in references(doc.read_text()) if (msg := check(tok, names))]
    assert not problems, f"{doc.relative_to(REPO)}:\n" + "\n".join(problems)


def test_checker_catches_a_missing_symbol_and_path():
    names = defined_names()
    assert check("lm_loss", names) is None
    assert check("training/trainer.py", names) is None
    assert check("no_such_function", names) is not None
    assert check("training/no_such_file.py", names) is not None
    assert check("TokenData.no_such_method", names) is not None


# Where a note says which file holds a symbol, the symbol must be defined in that file, not just
# somewhere: "`rope_tables` in `architectures/common/rope.py`" (or "`a`, `b` and `c` in ..."),
# "`training/optimizer.py`'s
# `lr_at`", "`lm_loss` (`architectures/common/loss.py`)", a path followed by a parenthesis
# naming what it holds ("`training/tokenizer.py` (the `Tokenizer` class and `get_tokenizer`)"),
# and a table row whose first cell is the file.
SYMBOLS_THEN_FILE = (re.compile(r"((?:`[^`\s]+`(?:, |,? and |,? or ))*`[^`\s]+`) in `([^`\s]+\.py)`"),
                     re.compile(r"(`[^`\s]+`) \(`([^`\s]+\.py)`\)"))
FILE_THEN_SYMBOLS = (re.compile(r"`([^`\s]+\.py)`'s (`[^`\s]+`)"), re.compile(r"`([^`\s]+\.py)` \(([^()]*)\)"),
                     re.compile(r"^\| `([^`\s]+\.py)` \| ([^|]*)\|", re.M))


def defined_in(path: Path) -> set[str]:
    """Every name a Python file defines: functions, classes, methods, and assigned names and attributes."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
    return names


def placements(text: str) -> list[tuple[str, str]]:
    """(symbol, file) for every symbol the text places in a file, by the patterns above."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    found = [(symbol, m.group(2)) for pattern in SYMBOLS_THEN_FILE for m in pattern.finditer(text)
             for symbol in re.findall(r"`([^`]+)`", m.group(1))]
    for pattern in FILE_THEN_SYMBOLS:
        for m in pattern.finditer(text):
            found += [(symbol, m.group(1)) for symbol in re.findall(r"`([^`]+)`", m.group(2))]
    return [(symbol, path) for symbol, path in found
            if is_symbol(symbol) and not symbol.endswith((".py", ".md")) and (REPO / path).is_file()]


def misplaced(text: str) -> list[str]:
    problems = []
    for symbol, path in placements(text):
        parts = [p for p in (symbol[:-2] if symbol.endswith("()") else symbol).split(".") if not p.isdigit()]
        missing = [p for p in parts if p not in defined_in(REPO / path)]
        if missing:
            problems.append(f"{symbol} is placed in {path}, which does not define {missing}")
    return problems


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(REPO)) for d in DOCS])
def test_a_symbol_placed_in_a_file_is_defined_there(doc):
    problems = misplaced(doc.read_text())
    assert not problems, f"{doc.relative_to(REPO)}:\n" + "\n".join(problems)


def test_placement_checker_catches_a_symbol_in_the_wrong_file():
    assert misplaced("from a custom op (`rope_tables` in `architectures/common/rope.py`)") == []
    assert misplaced("from a custom op (`rope_tables` in `architectures/llama3/model.py`)") != []
    assert misplaced("`architectures/llama3/model.py`'s `rope_tables`") != []
    assert misplaced("`with_aux_loss`, `rope_tables` and `family_on_step` in `training/posttrain.py`") != []
    assert misplaced("`with_aux_loss` and `family_on_step` in `training/posttrain.py`") == []
    assert misplaced("the loss (`lm_loss` (`training/trainer.py`))") != []
    assert misplaced("Read beside `training/tokenizer.py` (the `Tokenizer` class and `prepare_data`)") != []
    assert misplaced("| `training/tokenizer.py` | `Tokenizer.encode`, `Tokenizer.no_such` |") != []
    assert misplaced("| `training/tokenizer.py` | `Tokenizer.encode`, `get_tokenizer` |") == []


ZOO_PACKAGES = ("architectures", "training", "inference", "fundamentals")
SOURCES = DOCS + [f for d in ZOO_PACKAGES for f in sorted((REPO / d).rglob("*.py"))]


def missing_modules(text: str) -> list[str]:
    """The zoo modules that `python -m MODULE` commands in `text` name and that do not exist."""
    missing = []
    for module in re.findall(r"python -m ([A-Za-z_][\w.]*)", text):
        parts = module.split(".")
        if parts[0] not in ZOO_PACKAGES or module.endswith(".") or parts[-1].isupper():
            continue  # pytest, pip, torch.distributed.run, ...; or a template (architectures.<name>.train)
        path = REPO / Path(*parts)
        if not (path.with_suffix(".py").exists() or (path / "__main__.py").exists()):
            missing.append(module)
    return missing


@pytest.mark.parametrize("source", SOURCES, ids=[str(s.relative_to(REPO)) for s in SOURCES])
def test_every_command_names_a_module_that_exists(source):
    """A `python -m ...` in a note, the README or a docstring is what a reader pastes into a shell."""
    missing = missing_modules(source.read_text())
    assert not missing, f"{source.relative_to(REPO)} tells readers to run modules that do not exist: {missing}"


def test_command_checker_catches_a_moved_module():
    assert missing_modules("python -m architectures.llama3.train --preset tiny") == []
    assert missing_modules("python -m architectures.<name>.train") == []
    assert missing_modules("python -m architectures.llama3.generate --checkpoint DIR") == ["architectures.llama3.generate"]
