"""A callback tests/test_batch.py adds to every job's Trainer: what that Trainer and its process see."""

import json
import os
from pathlib import Path

import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only


class InnerTrainerProbe(Callback):
    def on_train_start(self, trainer, pl_module):
        seen = {
            "pid": os.getpid(),
            "world_size": trainer.world_size,
            "global_rank": trainer.global_rank,
            "strategy": type(trainer.strategy).__name__,
            "local_rank_env": os.environ.get("LOCAL_RANK"),
            "rank_zero_only": rank_zero_only.rank,
            "cluster": type(trainer._accelerator_connector.cluster_environment).__name__,
            "outer_world": dist.get_world_size() if dist.is_available() and dist.is_initialized() else None,
        }
        (Path(trainer.default_root_dir) / "probe.json").write_text(json.dumps(seen))
