"""Generate text with a Mamba-2 / Nemotron-H checkpoint (ours or a Hugging Face-format directory).

    python -m architectures.mamba2_hybrid.generate --checkpoint runs/mamba2_hybrid-tiny --prompt "ROMEO:"
"""

from architectures.mamba2_hybrid.pretrained import from_pretrained
from inference.cli import main

if __name__ == "__main__":
    main("mamba2_hybrid", from_pretrained)
