"""Generate text with a DeepSeek-V3 checkpoint (ours or a Hugging Face-format directory).

    python -m architectures.deepseek_v3.generate --checkpoint runs/deepseek_v3-tiny --prompt "ROMEO:"
"""

from architectures.deepseek_v3.pretrained import from_pretrained
from inference.cli import main

if __name__ == "__main__":
    main("deepseek_v3", from_pretrained)
