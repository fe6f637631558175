"""Generate text with a Mixtral checkpoint (ours or a Hugging Face-format directory).

    python -m architectures.mixtral.generate --checkpoint runs/mixtral-tiny --prompt "ROMEO:"
"""

from architectures.mixtral.pretrained import from_pretrained
from inference.cli import main

if __name__ == "__main__":
    main("mixtral", from_pretrained)
