"""`qlora_lite.train` as one rank of a torchrun launch, for the tests: `train_worker.py CONFIG [--resume]`.

Besides what the run writes (rank 0), each rank saves the adapter tensors it holds at the end (gathered whole when
the model is sharded) as `rank{RANK}.safetensors` in the run directory, so a test can compare the ranks.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from safetensors.torch import save_file

from qlora_lite.model.lora import adapter_state_dict
from qlora_lite.training import loop
from qlora_lite.training.run import Run

held: dict = {}
run = Run.run


def keep_adapter(self, *args, **kwargs):
    result = run(self, *args, **kwargs)
    if self.optimizer.sharded:  # a collective, so here, while the process group is still up
        from qlora_lite.training.fsdp import full_adapter_state

        state = full_adapter_state(self.model)
    else:
        state = adapter_state_dict(self.model)
    held["adapter"] = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    return result


Run.run = keep_adapter
result = loop.train(sys.argv[1], resume="--resume" in sys.argv, progress=False)
save_file(held["adapter"], str(Path(result.output_dir) / f"rank{os.environ.get('RANK', '0')}.safetensors"))
