"""Every inference command line ends a user's mistake with one `error: ...` line and exit status 2.

Each bad input runs the real command, its module run as `__main__` in a fresh Python process as
`python -m` does, and the test asserts what the user sees: a non-zero exit, exactly one line on
stderr, starting with `error:` and naming the offending value, and no traceback anywhere.
Starting Python with torch costs ~2 s on 2 cores, so the cases of one command share a process:
`DRIVER` runs them one after the other, capturing each one's exit status, stdout and stderr (an
exception that escapes is printed as Python would print it, traceback and all).

A case's arguments may name `{checkpoint}` (the tiny checkpoint below), `{truncated}` (the same with
its model.safetensors cut in half) or `{corpus}` (a small .txt corpus), filled in when it runs.

Also here: generate's one-line `note:` when the prompt leaves less room than --max-new-tokens,
its --help, and the benchmark without transformers installed or with another --family.
tests/inference/test_command_options.py has what the commands do with the options they now take.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from architectures import registry
from architectures.llama3 import Llama3, LlamaConfig, save_pretrained
from inference.generate import fit_to_context, main as generate_main
from training.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[2]
TEXT = "".join(f"Line {i}: to be, or not to be, that is the question.\n" for i in range(200))
CONTEXT = 32  # the checkpoint's max_position_embeddings: small, so prompts can overflow it
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")

DRIVER = """
import contextlib, io, json, runpy, sys, traceback
if sys.argv[1] == "no-transformers":
    sys.modules["transformers"] = None  # `import transformers` fails, as after `pip install -e .` alone
results = []
for module, argv in json.loads(sys.argv[2]):
    out, err, code = io.StringIO(), io.StringIO(), 0
    sys.argv = [module, *argv]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as e:  # what the interpreter does with it at exit
            code = e.code if isinstance(e.code, int) or e.code is None else 1
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            code = 1
    results.append({"code": code or 0, "stdout": out.getvalue(), "stderr": err.getvalue()})
print(json.dumps(results))
"""


def run_each(module: str, argvs: list[list[str]], no_transformers: bool = False) -> list[dict]:
    """Run `python -m module argv` for every argv, in one fresh process (see DRIVER)."""
    cases = json.dumps([[module, argv] for argv in argvs])
    proc = subprocess.run([sys.executable, "-c", DRIVER, "no-transformers" if no_transformers else "-", cases],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random tiny Llama 3 with a BPE tokenizer trained on TEXT: what `train` writes, in a second."""
    path = tmp_path_factory.mktemp("checkpoint")
    tokenizer = Tokenizer.train(TEXT, 300, "bpe")
    tokenizer.save(path / "tokenizer.json")
    torch.manual_seed(0)
    save_pretrained(Llama3(LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=CONTEXT)), path)
    return path


# Every bad input of each command: (arguments, what its error line must name). Tiny settings
# throughout, so a case that slipped past its check would still end quickly.
BENCH = ["--device", "cpu", "--preset", "tiny", "--num-prompts", "2", "--min-len", "4", "--max-len", "8",
         "--new-tokens", "2"]
MISSING = "no/such/checkpoint"
UNKNOWN_FAMILY = f"unknown architecture family 'gpt2'; the registered ones are {', '.join(registry.FAMILIES)}"
A_FILE = "README.md"  # relative to the repository, where the commands run: a file where a folder is expected
NOT_A_FOLDER = f"{A_FILE} is a file"
CASES = {
    "inference.generate": [  # after --checkpoint (the tiny one) --prompt "Line 3" --device cpu
        (["--device", "gpu0"], "unknown device 'gpu0'"),
        (["--device", "cuda"], "'cuda' requested but this torch sees no CUDA GPU"),
        (["--temperature", "nan"], "temperature must be a finite number, got nan"),
        (["--top-p", "inf"], "top_p must be a finite number, got inf"),
        (["--top-k", "inf"], "invalid int value: 'inf'"),
        (["--max-new-tokens", "-1"], "max_new_tokens must be >= 0, got -1"),
        (["--prompt", ""], "--prompt is empty"),
        (["--checkpoint", MISSING], f"--checkpoint {MISSING} does not exist"),
        (["--checkpoint", A_FILE], f"--checkpoint {NOT_A_FOLDER}"),
        (["--checkpoint", "{truncated}"], "the weights file {truncated}/model.safetensors is truncated or corrupt"),
        (["--adapter", MISSING], f"--adapter {MISSING} does not exist"),
        (["--adapter", A_FILE], f"--adapter {NOT_A_FOLDER}"),
        (["--adapter", "architectures"], "--adapter architectures is not a LoRA adapter: it has no adapter_config.json"),
        (["--adapter", "{checkpoint}"], "is a whole model (config.json), not a LoRA adapter; pass it as --checkpoint"),
        (["--kv-dtype", "int8", "--no-cache"], "--no-cache keeps none; drop one of them"),
    ],
    "inference.benchmarks.quantized_weights": [  # after --device cpu --corpus {corpus}
        (["--checkpoint", MISSING], f"--checkpoint {MISSING} does not exist"),
        (["--checkpoint", A_FILE], f"--checkpoint {NOT_A_FOLDER}"),
        (["--checkpoint", "architectures"], "architectures has no config.json"),
        (["--checkpoint", "{truncated}"], "the weights file {truncated}/model.safetensors is truncated or corrupt"),
        (["--checkpoint", "{checkpoint}", "--block-size", str(CONTEXT + 1)],
         f"--block-size {CONTEXT + 1} is longer than the model's context (max_position_embeddings={CONTEXT})"),
        (["--checkpoint", "{checkpoint}", "--block-size", "0"], "--block-size must be >= 1, got 0"),
        (["--checkpoint", "{checkpoint}", "--group-size", "-1"], "--group-size must be >= 1, got -1"),
        (["--checkpoint", "{checkpoint}"], "cannot be quantized to int4 with --group-size 64: group_size=64 does not "
                                           "divide in_features=32"),
        (["--checkpoint", "{checkpoint}", "--device", "gpu0"], "unknown device 'gpu0'"),
    ],
    "inference.benchmarks.quantized_kv": [
        (["--parts", "nonsense"], "unknown part 'nonsense' in --parts nonsense; give a comma list of kernel, capacity, "
                                  "speed, quality"),
        (["--parts", "kernel,"], "unknown part '' in --parts kernel,"),
        (["--budget-gib", "nan"], "--budget-gib must be a finite number > 0, got nan"),
        (["--budget-gib", "-1"], "--budget-gib must be a finite number > 0, got -1.0"),
        (["--seats", "0"], "--seats must be >= 1, got 0"),
        (["--long-len", "-5"], "--long-len must be >= 1, got -5"),
        (["--chunk", "0"], "--chunk must be >= 1, got 0"),
        (["--preset", "mixtral-8x7b"], "--preset 'mixtral-8x7b' is not a llama3 preset; llama3's presets are tiny, "),
        (["--checkpoint", MISSING], f"--checkpoint {MISSING} does not exist"),
        (["--checkpoint", A_FILE], f"--checkpoint {NOT_A_FOLDER}"),
        (["--checkpoint", "{checkpoint}", "--corpus", "no/such/corpus.txt"], "corpus file no/such/corpus.txt does not "
                                                                             "exist"),
        (["--device", "gpu0"], "unknown device 'gpu0'"),
    ],
    "inference.benchmarks.throughput": [  # after BENCH
        (["--num-prompts", "0"], "--num-prompts must be >= 1, got 0"),
        (["--min-len", "9"], "--min-len 9 is above --max-len 8"),
        (["--new-tokens", "0"], "--new-tokens must be >= 1, got 0"),
        (["--min-new-tokens", "3"], "--min-new-tokens must be in [1, --new-tokens=2], got 3"),
        (["--shared-prefix", "-1"], "--shared-prefix must be >= 0, got -1"),
        (["--hf-batch", "0"], "--hf-batch must be >= 1, got 0"),
        (["--block-size", "0"], "--block-size must be >= 1, got 0"),
        (["--kv-blocks", "0"], "--kv-blocks must be >= 1, got 0"),
        (["--family", "gpt2"], UNKNOWN_FAMILY),
        (["--family", "mixtral", "--engines", "hf,naive"], "hf runs Llama 3 only"),
        (["--device", "gpu0"], "unknown device 'gpu0'"),
        (["--device", "cuda"], "'cuda' requested but this torch sees no CUDA GPU"),
        (["--hidden-size", "big"], "--hidden-size expects int, got 'big'"),
        (["--preset", "mixtral-8x7b"], "--preset 'mixtral-8x7b' is not a llama3 preset; llama3's presets are tiny, "),
        (["--kv-dtype", "int3"], "argument --kv-dtype: invalid choice: 'int3'"),
        (["--kv-dtype", "int8", "--engines", "hf,naive"], "--kv-dtype int8 sets the zoo engines' cache; the "
                                                          "transformers baseline hf keeps its own"),
        (["--kv-dtype", "int4", "--block-size", "15"], "--kv-dtype int4 groups each block's keys (two 4-bit codes a "
                                                       "byte): --block-size must be even, got 15"),
        # An odd latent width: refused before the first engine runs, in the engines' own words.
        (["--kv-dtype", "int4", "--family", "deepseek_v3", "--kv-lora-rank", "33"],
         "kv_dtype='int4' packs pairs of numbers: layer 0 caches latent of width 49, which is odd"),
        (["--out", A_FILE], f"--out {NOT_A_FOLDER}; pass a directory"),
    ],
    "inference.memory": [
        (["--family", "gpt2"], UNKNOWN_FAMILY),
        (["--mean-len", "0"], "--mean-len must be in [1, --seq-len=8192], got 0"),  # 0 used to mean "the default"
        (["--seq-len", "0"], "--seq-len must be >= 1, got 0"),
        (["--batch", "-2"], "--batch must be >= 1, got -2"),
        (["--family", "mixtral", "--preset", "llama-3.2-1b"], "--preset 'llama-3.2-1b' is not a mixtral preset; "
                                                              "mixtral's presets are tiny, shakespeare, mixtral-8x7b"),
        (["--preset", "nonsense"], "--preset 'nonsense' is not a llama3 preset"),
        (["--kv-dtype", "int4", "--block-size", "15"], "int4 packs two tokens' key codes per byte"),
    ],
    "inference.benchmarks.paged_decode": [
        (["--iters", "0"], "--iters must be >= 1, got 0"),
        ([], "needs a CUDA GPU"),
        (["--grid", "tile=64 warps=4"], "--grid entry 'warps=4': write NAME=V1,V2 with NAME one of tile, num_warps"),
        (["--shape", "deepseek-v3", "--kv-dtype", "int8"], "times the latent cache in bf16; drop --kv-dtype int8"),
        (["--kv-dtype", "int4", "--sweep"], "for int4 give --grid"),
        (["--grid", "tile=abc"], "--grid entry 'tile=abc': 'abc' is not a whole number >= 1"),
        (["--splits", "4,x"], "--splits 4,x: 'x' is not a whole number >= 1 (or None for the automatic choice)"),
        (["--batch", "0"], "--batch must be >= 1, got 0"),
    ],
    "architectures.mixtral.benchmarks.moe_layer": [
        (["--device", "gpu0"], "unknown device 'gpu0'"),
        (["--device", "cpu", "--iters", "0"], "--iters must be >= 1, got 0"),
        (["--device", "cpu", "--impls", "ours,fast"], "unknown --impls 'fast'"),
    ],
}


@pytest.fixture(scope="module")
def files(checkpoint, tmp_path_factory):
    """What a case's `{name}` stands for: the tiny checkpoint, a truncated copy, a small corpus."""
    folder = tmp_path_factory.mktemp("files")
    truncated = folder / "truncated"
    shutil.copytree(checkpoint, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    (folder / "corpus.txt").write_text(TEXT)
    return {"checkpoint": str(checkpoint), "truncated": str(truncated), "corpus": str(folder / "corpus.txt")}


@pytest.fixture(scope="module")
def outcome(checkpoint, files, tmp_path_factory):
    """outcome(module, argv) -> what the command printed and returned; a command's cases run together."""
    generate = ["--checkpoint", str(checkpoint), "--prompt", "Line 3", "--device", "cpu"]
    before = {"inference.generate": generate, "inference.benchmarks.throughput": BENCH,
              "inference.benchmarks.quantized_weights": ["--device", "cpu", "--corpus", "{corpus}"]}
    done: dict[str, dict] = {}

    def get(module: str, argv: list[str]) -> dict:
        if module not in done:
            argvs = [argv for argv, _ in CASES[module]]
            filled = [[a.format(**files) for a in before.get(module, []) + argv] for argv in argvs]
            with pytest.MonkeyPatch.context() as mp:  # the token cache of a corpus goes to a temporary folder
                mp.setenv("ZOO_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
                runs = run_each(module, filled)
            done[module] = dict(zip(map(tuple, argvs), runs))
        return done[module][tuple(argv)]
    return get


def assert_one_error_line(result: dict, names: str) -> None:
    assert "Traceback" not in result["stdout"] + result["stderr"], result["stderr"]
    assert result["code"] != 0, "a user error must end with a non-zero exit status"
    lines = result["stderr"].splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result["stderr"]
    assert names in lines[0], f"the error should name {names!r}: {lines[0]}"


def _case(module: str, argv: list[str], names: str):
    command = module.removeprefix("architectures.").removeprefix("inference.")
    return pytest.param(module, argv, names, id=f"{command} {' '.join(argv)}",
                        marks=[NO_GPU] if "CUDA GPU" in names else [])


@pytest.mark.parametrize("module,argv,names", [_case(m, *case) for m, cases in CASES.items() for case in cases])
def test_a_bad_input_ends_the_command_with_one_error_line(outcome, files, module, argv, names):
    assert_one_error_line(outcome(module, argv), names.format(**files))


def test_benchmark_without_transformers_runs_the_zoo_engines_and_says_why_hf_is_left_out():
    ran, asked = run_each("inference.benchmarks.throughput", [BENCH, BENCH + ["--engines", "hf"]], no_transformers=True)
    assert ran["code"] == 0 and "Traceback" not in ran["stderr"], ran["stderr"]
    engines = [line.split()[1] for line in ran["stdout"].splitlines() if line.startswith("bench ")]
    assert engines == ["engine=naive", "engine=paged"]
    lines = ran["stderr"].splitlines()
    assert len(lines) == 1 and lines[0].startswith("note: leaving out the transformers baseline hf"), ran["stderr"]
    assert 'pip install -e ".[test]"' in lines[0]
    assert_one_error_line(asked, "--engines hf (the transformers baseline) needs transformers")


# ---- generate: a prompt that does not leave room for --max-new-tokens ----------------------------

def test_fit_to_context_generates_what_fits_and_crops_a_prompt_longer_than_the_context():
    assert fit_to_context([1] * 10, 20, 32) == ([1] * 10, 20, None)
    ids, new, note = fit_to_context([1] * 30, 20, 32)
    assert (len(ids), new) == (30, 2)
    assert note == "the prompt has 30 tokens and the model's context is 32: generating 2 new tokens, not 20"
    # Longer than the context: keep the last tokens, with room for the new ones but at least half the context.
    prompt = list(range(40))
    assert fit_to_context(prompt, 4, 32)[:2] == (prompt[-28:], 4)
    ids, new, note = fit_to_context(prompt, 100, 32)
    assert (ids, new) == (prompt[-16:], 16)
    assert note == ("the prompt has 40 tokens and the model's context is 32: keeping its last 16 tokens, "
                    "and generating 16 new tokens, not 100")
    assert fit_to_context([7] + prompt, 4, 32, keep_first=1)[0] == [7] + prompt[-27:], "the bos stays in front"


def test_generate_cli_says_in_one_line_how_many_tokens_fit(checkpoint, capsys):
    text = "Line 3: to be, or not to be, that is the question."
    P = len(Tokenizer.from_file(checkpoint / "tokenizer.json").encode(text))
    assert P < CONTEXT - 1
    out = generate_main(["--checkpoint", str(checkpoint), "--prompt", text,
                                                    "--max-new-tokens", "200", "--temperature", "0"])
    captured = capsys.readouterr()
    assert captured.err == (f"note: the prompt has {P} tokens and the model's context is {CONTEXT}: "
                            f"generating {CONTEXT - P} new tokens, not 200\n")
    assert out.startswith(text) and captured.out.startswith(text)


def test_generate_cli_crops_a_prompt_longer_than_the_context_from_the_left(checkpoint, capsys):
    text = TEXT[:400]
    P = len(Tokenizer.from_file(checkpoint / "tokenizer.json").encode(text))
    assert P > CONTEXT
    generate_main(["--checkpoint", str(checkpoint), "--prompt", text,
                                              "--max-new-tokens", "8", "--temperature", "0"])
    assert capsys.readouterr().err == (f"note: the prompt has {P} tokens and the model's context is {CONTEXT}: "
                                       f"keeping its last {CONTEXT - 8} tokens\n")


def test_generate_help_shows_every_default(capsys):
    with pytest.raises(SystemExit) as exit:
        generate_main(["--help"])
    assert exit.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for default in ("(default: 200)", "(default: 0.8)", "(default: 50)", "(default: 1.0)", "(default: auto)"):
        assert default in text
    assert text.count("(default: None)") == 1, "only --seed defaults to None; required options show no default"


# ---- --family -----------------------------------------------------------------------------------

def test_benchmark_runs_a_mixtral_model_with_the_zoo_engines(capsys):
    from inference.benchmarks.throughput import main as benchmark_main

    results = benchmark_main([*BENCH, "--family", "mixtral"])
    assert list(results) == ["naive", "paged"], "hf is a Llama 3 baseline: left out of the default for mixtral"
    assert "family=mixtral" in capsys.readouterr().out


def test_benchmark_with_another_family_names_its_presets_when_none_is_given(command_error):
    from inference.benchmarks.throughput import main as benchmark_main

    assert command_error(benchmark_main, ["--family", "mixtral", "--device", "cpu"]) == (
        "error: --family mixtral needs a --preset (the default llama-3.2-1b is llama3's); mixtral's presets are "
        "tiny, shakespeare, mixtral-8x7b")
