"""gas-lightning: multi-attribute image editing with Ground-A-Score on PyTorch Lightning."""

from gas_lightning.errors import GasError, PlanError
from gas_lightning.plan import EditPlan, Subtask

__all__ = ["EditPlan", "Subtask", "GasError", "PlanError"]
__version__ = "0.1.0"
