"""Which device and which number format a command runs in, decided in one place.

Every train script, generate, the benchmarks and the inference engine take `--device` and
`--dtype` with the same meaning:
- device "auto" is the first CUDA GPU if torch sees one, else the CPU; "cpu", "cuda" and
  "cuda:N" are checked against what this torch and this machine have;
- dtype "auto" is bf16 on a GPU and fp32 on a CPU ("bf16" and "fp32" force one). Training
  runs bf16 as autocast over fp32 weights; inference casts the weights themselves.
"""

from __future__ import annotations

import torch

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {name!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but this torch sees no CUDA GPU "
                             f"(torch {torch.__version__}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    elif device.type != "cpu":
        raise ValueError(f"device {name!r} is not supported; use 'cpu' or 'cuda[:N]'")
    return device


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """"auto" -> bf16 on CUDA, fp32 elsewhere; "bf16" / "fp32" as named."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype must be 'auto', 'bf16' or 'fp32', got {name!r}")
    return DTYPES[name]


def device_label(device: torch.device) -> str:
    """What a figure was measured on: the GPU's name, or the CPU with its thread count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


DEVICE_HELP = "auto (the first GPU, else the CPU), cpu, cuda or cuda:N"
DTYPE_HELP = "number format: auto is bf16 on a GPU, fp32 on the CPU"


def add_device_option(parser, default: str | None = "auto", help: str = DEVICE_HELP) -> None:
    """The one `--device` option every command line takes, read by `resolve_device`."""
    parser.add_argument("--device", default=default, help=help)


def add_dtype_option(parser, help: str = DTYPE_HELP) -> None:
    """The one `--dtype` option (auto, bf16, fp32), read by `compute_dtype`."""
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help=help)
