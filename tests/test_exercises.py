"""The notes end in exercises, and each exercise names what checks its answer.

- Every note of the course (COURSE) has an `## Exercises` section, and every note that has one holds
  at least 3 numbered exercises.
- Each exercise names its check: a pytest node id in backticks (`tests/x/test_y.py::test_name`) or a
  `python -m ...` command in backticks.
- Every node id names a test file that exists and defines that test function (at module level or in a
  class), so an exercise cannot point at a test that was renamed away.
- Every `python -m` module an exercise names answers `--help` with exit status 0 (one subprocess per
  distinct module, run side by side; marked slow since each one imports torch).
- No concept note's lesson (the note without its Exercises section) runs past LESSON_LINES lines;
  longer measurement detail belongs in its lab record.
- A note whose measurement history sits in a lab record (`notes/lab/<name>.md`) links to it, and every
  image or link in a note or a lab record resolves from the file that holds it.
"""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTES = REPO / "notes"
COURSE = ("fundamentals", "tokenizer", "attention", "llama3", "training-loop", "long-context", "mixtral",
          "deepseek-v3", "mamba2", "quantization", "lora", "distillation", "kv-cache", "sft",
          "paged-attention", "serving", "dpo", "gemma", "stable-diffusion", "grpo", "ppo")
WITH_EXERCISES = sorted(p.stem for p in NOTES.glob("*.md") if "\n## Exercises\n" in p.read_text())
ALL_DOCS = sorted(NOTES.rglob("*.md"))
NODE_ID = re.compile(r"`(tests/[\w/.-]+\.py)::([\w]+)(?:::(\w+))?(?:\[[^\]`]*\])?`")
COMMAND = re.compile(r"`python -m ([A-Za-z_][\w.]*)[^`]*`")


def exercise_section(text: str) -> str | None:
    m = re.search(r"^## Exercises\n(.*?)(?=^## |^Next:|\Z)", text, flags=re.S | re.M)
    return m.group(1) if m else None


def exercises(text: str) -> list[str]:
    """The numbered items of the note's Exercises section, each as one string (its wrapped lines joined)."""
    section = exercise_section(text)
    if section is None:
        return []
    items = re.split(r"^\d+\. ", section, flags=re.M)[1:]
    return [" ".join(item.split()) for item in items]


def checks_named(exercise: str) -> tuple[list[tuple[str, str, str | None]], list[str]]:
    """(node ids as (file, function, method or None), python -m modules) an exercise names in backticks."""
    return [m.groups() for m in NODE_ID.finditer(exercise)], COMMAND.findall(exercise)


def defines_test(path: Path, name: str, method: str | None) -> bool:
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if method is None and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            return True
        if method is not None and isinstance(node, ast.ClassDef) and node.name == name:
            return any(isinstance(f, ast.FunctionDef) and f.name == method for f in node.body)
    return False


def broken_node_ids(text: str) -> list[str]:
    problems = []
    for exercise in exercises(text):
        for file, name, method in checks_named(exercise)[0]:
            path = REPO / file
            if not path.is_file():
                problems.append(f"{file} does not exist")
            elif not defines_test(path, name, method):
                problems.append(f"{file} defines no test {name}{'::' + method if method else ''}")
    return problems


@pytest.mark.parametrize("name", COURSE)
def test_every_course_note_has_exercises(name):
    assert exercise_section((NOTES / f"{name}.md").read_text()) is not None, f"notes/{name}.md has no ## Exercises"


@pytest.mark.parametrize("name", WITH_EXERCISES)
def test_at_least_three_exercises_each_naming_its_check(name):
    found = exercises((NOTES / f"{name}.md").read_text())
    assert len(found) >= 3, f"notes/{name}.md has {len(found)} exercises, fewer than 3"
    unchecked = [e[:80] for e in found if not any(checks_named(e))]
    assert not unchecked, f"notes/{name}.md: exercises that name no test or command:\n" + "\n".join(unchecked)


@pytest.mark.parametrize("name", WITH_EXERCISES)
def test_every_test_an_exercise_names_exists(name):
    problems = broken_node_ids((NOTES / f"{name}.md").read_text())
    assert not problems, f"notes/{name}.md:\n" + "\n".join(problems)


def test_the_checker_catches_what_it_should():
    good = "## Exercises\n\n1. a `tests/test_exercises.py::test_the_checker_catches_what_it_should`\n" \
           "2. b `python -m inference.memory --kv-dtype int8`\n3. c `tests/test_notes.py::test_checker_catches_a_missing_symbol_and_path`\n\nNext: x\n"
    assert len(exercises(good)) == 3 and broken_node_ids(good) == []
    assert checks_named(exercises(good)[1]) == ([], ["inference.memory"])
    assert broken_node_ids(good.replace("test_the_checker_catches", "test_no_such")) != []
    assert broken_node_ids(good.replace("tests/test_notes.py", "tests/no_such.py")) != []
    assert not any(checks_named("compute it by hand, `a_symbol`"))
    assert exercises("## Exercises\n\n1. one\n\n## Next section\n\n2. not an exercise\n") == ["one"]


def modules_named() -> list[str]:
    return sorted({module for name in WITH_EXERCISES for e in exercises((NOTES / f"{name}.md").read_text())
                   for module in checks_named(e)[1]})


@pytest.mark.slow
def test_every_command_an_exercise_names_answers_help():
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    running = {m: subprocess.Popen([sys.executable, "-m", m, "--help"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True) for m in modules_named()}
    failed = []
    for module, proc in running.items():
        _, err = proc.communicate(timeout=300)
        if proc.returncode != 0:
            failed.append(f"python -m {module} --help: exit {proc.returncode}: {err.strip().splitlines()[-1:]}")
    assert not failed, "\n".join(failed)


LESSON_LINES = 320
NOT_CONCEPT_NOTES = ("README", "contributing")  # the reading order and the house rules, not lessons


def lesson_lines(text: str) -> int:
    """Lines of a note without its `## Exercises` section (the heading up to the next heading or "Next:")."""
    m = re.search(r"^## Exercises\n.*?(?=^## |^Next:|\Z)", text, flags=re.S | re.M)
    return len((text[:m.start()] + text[m.end():] if m else text).splitlines())


def test_no_lesson_is_longer_than_the_limit():
    lengths = {p.name: lesson_lines(p.read_text()) for p in NOTES.glob("*.md") if p.stem not in NOT_CONCEPT_NOTES}
    assert len(lengths) >= 15, "the concept notes were not found"
    offenders = sorted(f"notes/{name}: {n} lines" for name, n in lengths.items() if n > LESSON_LINES)
    assert not offenders, f"lessons longer than {LESSON_LINES} lines (move measurement detail to notes/lab/):\n" + \
        "\n".join(offenders)


def test_lesson_lines_leave_out_the_exercises_only():
    note = "# T\n\nbody\n\n## Exercises\n\n1. a\n2. b\n\nNext: x\n"
    assert lesson_lines(note) == 5  # "# T", "", "body", "", "Next: x"
    assert lesson_lines("# T\n\n## Exercises\n\n1. a\n\n## Appendix\n\nz\n") == 5
    assert lesson_lines("a\n" * 321) == 321


LAB = sorted((NOTES / "lab").glob("*.md"))


@pytest.mark.parametrize("lab", [p for p in LAB if p.name != "README.md"], ids=lambda p: p.name)
def test_a_lesson_links_its_lab_record(lab):
    lesson = NOTES / lab.name
    assert lesson.is_file(), f"notes/lab/{lab.name} is the lab record of no lesson"
    assert f"`notes/lab/{lab.name}`" in lesson.read_text(), f"notes/{lab.name} does not name notes/lab/{lab.name}"


@pytest.mark.parametrize("doc", ALL_DOCS, ids=lambda p: str(p.relative_to(NOTES)))
def test_every_image_and_link_resolves_from_its_file(doc):
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
    targets = [t.split("#")[0] for t in re.findall(r"\]\(([^)\s]+)\)", text) if not t.startswith(("http", "#"))]
    missing = [t for t in targets if not (doc.parent / t).exists()]
    assert not missing, f"{doc.relative_to(REPO)}: links that resolve to nothing: {missing}"
