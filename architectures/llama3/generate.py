"""Generate text with a Llama 3 checkpoint (ours or a Hugging Face-format directory).

    python -m architectures.llama3.generate --checkpoint runs/llama3-tiny --prompt "ROMEO:"
"""

from architectures.llama3.pretrained import from_pretrained
from inference.cli import main

if __name__ == "__main__":
    main("llama3", from_pretrained)
