"""Run by tests/training/test_distributed.py under torchrun: the toy problem on N processes.

    ddp_worker.py OUT ACCUM STRATEGY MAX_STEPS [resume]
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from toy import config, sample_batch, tiny_model  # noqa: E402

from architectures.llama3 import save_pretrained  # noqa: E402
from training.lm import lm_loss  # noqa: E402
from training.trainer import train  # noqa: E402

if __name__ == "__main__":
    out, accum, strategy, max_steps = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    resume = sys.argv[5:] == ["resume"]
    cfg = config(max_steps=max_steps, grad_accum_steps=accum, eval_interval=6, parallel=strategy, checkpoint_interval=3)
    model = tiny_model()
    train(model, lm_loss, sample_batch, cfg, out, save_model=save_pretrained, resume=resume)
    # Elements of the parameters this process holds (FSDP2: its shards), for the memory test.
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())
    rank = os.environ.get("RANK", "0")
    Path(out, f"local_params_rank{rank}.json").write_text(json.dumps({"local": local}))
