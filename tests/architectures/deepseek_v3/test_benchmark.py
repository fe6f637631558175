"""The DeepSeek-V3 benchmark runs both parts on a CPU with tiny shapes in seconds, checks that what it
times beside each other computes the same function, and prints one parseable line per measurement.

Tiny shape (architectures/deepseek_v3/benchmarks/layers.py `TINY`): 2 layers, 4 heads, d_c 32, d_r 8, d_n 16,
d_v 16; 8 routed experts in 4 groups (top-2 groups), top-2, 2 shared. The GPU sizes are run by hand.
"""

import pytest

from architectures.deepseek_v3.benchmarks.layers import main


def parse(out: str) -> list[dict[str, str]]:
    lines = [l for l in out.splitlines() if l.startswith("bench ")]
    assert lines, out
    return [dict(kv.split("=", 1) for kv in l.split()[1:]) for l in lines]


def test_both_parts_run_beside_their_baselines_and_every_line_parses(capsys):
    main(["--device", "cpu", "--batch", "2", "--context", "40", "--steps", "2", "--tokens", "96"])
    rows = parse(capsys.readouterr().out)
    assert [r["part"] for r in rows] == ["decode"] * 4 + ["moe"] * 5  # check, kv bytes, 2 forms; 2 checks, 3 impls

    check, kv, *forms = rows[:4]
    # fp32: the absorbed and the decompressing forms are the same sums in another order.
    assert check["agree"] == "True" and float(check["max_abs_diff"]) < 1e-4 * max(1.0, float(check["max_abs_logit"]))
    # latent: 2 layers x (d_c 32 + d_r 8) x 4 bytes; per-head K/V: 2 x 4 heads x (d_n + d_r 24 + d_v 16) x 4 bytes
    assert (int(kv["latent"]), int(kv["per_head_kv"])) == (320, 1280)
    assert {(f["form"], f["baseline"]) for f in forms} == {("absorbed", "explicit"), ("explicit", "absorbed")}
    for f in forms:
        assert (f["batch"], f["context"], f["steps"], f["kv_bytes_per_token"]) == ("2", "40", "2", "320")
        assert float(f["ms_per_step"]) > 0 and float(f["tokens_per_s"]) > 0 and float(f[f"vs_{f['baseline']}"]) > 0

    checks, impls = rows[4:6], rows[6:]
    assert [(c["baseline"], c["agree"]) for c in checks] == [("hf_grouped_mm", "True"), ("hf_eager", "True")]
    assert all(float(c["out_rel_err"]) < 1e-4 and float(c["grad_rel_err"]) < 1e-4 for c in checks)
    assert [r["impl"] for r in impls] == ["ours", "hf_grouped_mm", "hf_eager"]
    for r in impls:
        assert (r["tokens"], r["experts"], r["top_k"], r["shared"], r["groups"]) == ("96", "8", "2", "2", "4")
        assert float(r["ms"]) > 0 and all(float(r[f"vs_{o}"]) > 0 for o in r["baseline"].split(","))


def test_decode_forms_agree_within_the_bf16_tolerance(capsys):
    main(["--device", "cpu", "--part", "decode", "--dtype", "bf16", "--context", "24", "--steps", "1"])
    check = parse(capsys.readouterr().out)[0]
    assert check["check"] == "next_token_logits" and check["dtype"] == "bf16" and check["agree"] == "True"


@pytest.mark.parametrize("argv, message", [
    (["--batch", "0"], "--batch must be >= 1, got 0"),
    (["--context", "0"], "--context must be >= 1, got 0"),
    (["--context", "-3"], "--context must be >= 1, got -3"),
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--part", "prefill"], "invalid choice: 'prefill'"),
    (["--batch", "two"], "--batch"),
])
def test_bad_arguments_are_one_line_errors(command_error, argv, message):
    assert message in command_error(main, ["--device", "cpu", *argv])
