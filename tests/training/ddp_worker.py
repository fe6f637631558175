"""Run by tests/training/test_distributed.py under torchrun: the toy problem on N processes.

    ddp_worker.py OUT ACCUM STRATEGY MAX_STEPS [resume | hooks]

`hooks`: the post-training variant (masked rows, a token-summed loss, a frozen reference).
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from toy import config, masked_batch, sample_batch, summed_loss_with_reference, tiny_model  # noqa: E402

from architectures.llama3 import save_pretrained  # noqa: E402
from architectures.common.loss import lm_loss  # noqa: E402
from training.trainer import train  # noqa: E402

if __name__ == "__main__":
    out, accum, strategy, max_steps = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    resume, hooks = sys.argv[5:] == ["resume"], sys.argv[5:] == ["hooks"]
    cfg = config(max_steps=max_steps, grad_accum_steps=accum, eval_interval=6, parallel=strategy, checkpoint_interval=3)
    model, reference = tiny_model(), tiny_model(seed=1)
    if hooks:
        train(model, summed_loss_with_reference, masked_batch, cfg, out, save_model=save_pretrained,
              frozen={"reference": reference})
    else:
        train(model, lm_loss, sample_batch, cfg, out, save_model=save_pretrained, resume=resume)

    def local(m):
        """Elements of the parameters this process holds (FSDP2: its shards), for the memory tests."""
        return sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in m.parameters())

    rank = os.environ.get("RANK", "0")
    Path(out, f"local_params_rank{rank}.json").write_text(json.dumps({"local": local(model),
                                                                     "reference": local(reference)}))
