"""A callback the DDP test adds through --trainer.callbacks: every rank saves its final latent."""

from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback


class SaveLatentPerRank(Callback):
    def __init__(self, dirpath: str):
        self.dirpath = dirpath

    def on_train_end(self, trainer, pl_module):
        Path(self.dirpath).mkdir(parents=True, exist_ok=True)
        torch.save(pl_module.latent.detach().cpu(), Path(self.dirpath) / f"rank{trainer.global_rank}.pt")


class SaveLatentAndSource(Callback):
    """Every rank saves its final latent and its source latent (tests/test_ddp_mean.py)."""

    def __init__(self, dirpath: str):
        self.dirpath = dirpath

    def on_train_end(self, trainer, pl_module):
        Path(self.dirpath).mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "latent": pl_module.latent.detach().cpu(),
                "z_src": pl_module.z_src.detach().cpu(),
                "step": trainer.global_step,
            },
            Path(self.dirpath) / f"rank{trainer.global_rank}.pt",
        )
