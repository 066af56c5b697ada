"""gas-lightning: multi-attribute image editing with Ground-A-Score (grounded score distillation) on PyTorch Lightning."""

from gas_lightning.errors import GasError, PlanError
from gas_lightning.plan import EditPlan, Subtask


def __getattr__(name: str):
    """`edit`, `plan_edit`, `load_model` and `EditResult` import torch and Lightning: loaded on first use."""
    if name in ("edit", "plan_edit", "load_model", "EditResult"):
        from gas_lightning import api

        return getattr(api, name)
    raise AttributeError(f"module 'gas_lightning' has no attribute {name!r}")


__all__ = ["edit", "plan_edit", "load_model", "EditResult", "EditPlan", "Subtask", "GasError", "PlanError"]
__version__ = "0.1.0"
