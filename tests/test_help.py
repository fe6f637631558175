"""Every command of the zoo explains itself: each option it declares has a help text (its --help
line), and each runnable module ends a user's mistake in one line (its main is wrapped in
`command_line`, architectures/utils/command_line.py). Checked on the source, so a new script is
held to it before anyone runs it."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for folder in ("architectures", "training", "inference", "fundamentals")
                 for p in (ROOT / folder).rglob("*.py"))
RUNNABLE = [p for p in SOURCES if 'if __name__ == "__main__"' in p.read_text()]


@pytest.mark.parametrize("path", SOURCES, ids=[str(p.relative_to(ROOT)) for p in SOURCES])
def test_every_option_has_a_help_text(path):
    missing = [f"line {n.lineno}: {ast.unparse(n)[:80]}" for n in ast.walk(ast.parse(path.read_text()))
               if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "add_argument"
               and not any(k.arg == "help" for k in n.keywords)]
    assert not missing, f"{path.relative_to(ROOT)}: options without help:\n" + "\n".join(missing)


@pytest.mark.parametrize("path", RUNNABLE, ids=[str(p.relative_to(ROOT)) for p in RUNNABLE])
def test_every_command_turns_a_users_mistake_into_one_line(path):
    tree = ast.parse(path.read_text())
    mains = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main"]
    assert mains, f"{path.relative_to(ROOT)} runs as a command but has no main()"
    assert any("command_line" in ast.unparse(d) for d in mains[0].decorator_list), \
        f"{path.relative_to(ROOT)}: main() is not wrapped in command_line"
    assert "argparse.ArgumentParser(" not in path.read_text(), \
        f"{path.relative_to(ROOT)}: use architectures.utils.command_line.ArgumentParser (one-line errors, defaults in --help)"
