"""Concept figures for the notes: diagrams drawn from the definitions, not measurements.

    python -m fundamentals.experiments.concept_figures              # every figure into notes/figures/
    python -m fundamentals.experiments.concept_figures --only masks rope

Each figure is one function of `FIGURES`, drawn with matplotlib from the same rule the code
applies (the masks are `fundamentals.attention`'s own; RoPE's angles are the zoo's formula), so a
figure cannot drift from what the code does. The drawing helpers are in
fundamentals/experiments/diagrams.py.
"""

from __future__ import annotations

from pathlib import Path

from architectures.utils.command_line import ArgumentParser, command_line
from fundamentals.experiments import diagrams

FIGURES = {
    "masks": diagrams.draw_masks,
    "gqa": diagrams.draw_gqa,
    "rope": diagrams.draw_rope,
    "mla": diagrams.draw_mla,
    "paged-blocks": diagrams.draw_paged_blocks,
    "ssd-chunks": diagrams.draw_ssd_chunks,
    "lora-dora": diagrams.draw_lora_dora,
    "kivi": diagrams.draw_kivi,
}


@command_line
def main(argv=None) -> list[Path]:
    p = ArgumentParser(prog="python -m fundamentals.experiments.concept_figures", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="notes/figures", help="folder the .png files are written to")
    p.add_argument("--only", nargs="+", choices=sorted(FIGURES), default=None, help="draw only these figures")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in args.only or FIGURES:
        path = out / f"{name}.png"
        FIGURES[name](path)
        print(f"figure: {path}")
        written.append(path)
    return written


if __name__ == "__main__":
    main()
