"""The house rules of the repository's layout, checked on the source itself (notes/contributing.md).

- Layers: `architectures/utils/` (the ground floor) < `architectures/` < `inference/` < `training/`
  < `fundamentals/`. A library module imports only its own layer or lower ones; the ground floor
  imports nothing of the zoo.
- Scripts (a folder's `train.py`, the inference commands `inference/generate.py`, `inference/serve.py` and
  `inference/chat.py`, the runnable modules of a `benchmarks/`
  or `experiments/` folder) sit on top of every layer and may import any library module, but never
  another script: what two scripts share is a library (beside them, without a __main__ block, if
  only that folder's scripts use it).
- No import loop between files (imports inside functions count: a loop is a loop).
- No source file over 400 lines; no function over 100 lines except Triton kernels (@triton.jit),
  whose body is one GPU program.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("architectures", "training", "inference", "fundamentals")
MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 100


def modules() -> dict[str, Path]:
    found = {}
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


MODULES = modules()


LAYERS = ("architectures.utils", "architectures", "inference", "training", "fundamentals")  # lowest first


def layer(module: str) -> int:
    """The module's place in LAYERS: the longest prefix that names a layer."""
    return max(i for i, name in enumerate(LAYERS) if module == name or module.startswith(name + "."))


ENTRY_SCRIPTS = ("inference.generate", "inference.serve", "inference.chat",  # the inference commands
                 "architectures.stable_diffusion.sample")  # a diffusion model's sampler


def is_script(module: str) -> bool:
    """A folder's train.py, an inference command (ENTRY_SCRIPTS), or a runnable module (one with a __main__
    block) in a benchmarks/ or experiments/ folder; a module there without one is the library its scripts share."""
    parts = module.split(".")
    if parts[-1] == "train" or module in ENTRY_SCRIPTS:
        return True
    runnable = 'if __name__ == "__main__"' in MODULES[module].read_text()
    return runnable and ("benchmarks" in parts[:-1] or "experiments" in parts[:-1])


def imports(module: str) -> set[str]:
    """The zoo modules `module` imports, anywhere in the file (a package import counts as its __init__)."""
    out = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            targets = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != module:
                out.add(target)
    return out


GRAPH = {m: imports(m) for m in MODULES}


def package_parents(module: str) -> set[str]:
    """The packages a module lives in: importing `a.b.c` runs `a` and `a.b` first, which is no arrow."""
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def script_level(module: str) -> bool:
    """Scripts, and the libraries in a benchmarks/ or experiments/ folder that only its scripts use,
    sit above every layer."""
    parts = module.split(".")
    return is_script(module) or "benchmarks" in parts[:-1] or "experiments" in parts[:-1]


def test_library_modules_import_only_their_own_layer_or_lower_ones():
    upward = [f"{m} -> {t}" for m, ts in GRAPH.items() if not script_level(m)
              for t in ts if layer(t) > layer(m) and t not in package_parents(m)]
    assert not upward, "library modules importing a higher layer:\n" + "\n".join(upward)


def test_the_ground_floor_imports_nothing_of_the_zoo():
    bad = [f"{m} -> {t}" for m, ts in GRAPH.items() if layer(m) == 0 for t in ts if layer(t) != 0]
    assert not bad, "\n".join(bad)


def test_no_script_imports_another_script():
    bad = [f"{m} -> {t}" for m, ts in GRAPH.items() for t in ts if is_script(t) and t not in package_parents(m)]
    assert not bad, "scripts imported by other modules (move what they share into a library):\n" + "\n".join(bad)


def test_no_import_loop_between_files():
    """Tarjan's strongly connected components over the import graph: any component of two or more
    files is a loop."""
    index, low, stack, on_stack, loops = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v] - package_parents(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                loops.append(sorted(component))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert not loops, f"import loops: {loops}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_files_and_functions_are_short_enough_to_read_in_one_sitting(module):
    source = MODULES[module].read_text()
    lines = source.count("\n")
    assert lines <= MAX_FILE_LINES, f"{MODULES[module].relative_to(ROOT)} has {lines} lines (at most {MAX_FILE_LINES})"
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            kernel = any("triton.jit" in ast.unparse(d) for d in node.decorator_list)
            assert kernel or length <= MAX_FUNCTION_LINES, \
                f"{MODULES[module].relative_to(ROOT)}:{node.lineno} {node.name} has {length} lines"
