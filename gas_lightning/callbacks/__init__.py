"""Lightning callbacks of an edit: null-text penalty, previews, final outputs, the step progress bar."""

from gas_lightning.callbacks.nan_guard import NanGuard
from gas_lightning.callbacks.outputs import EditOutputs, FinalCheckpoint
from gas_lightning.callbacks.penalty import NullTextPenalty
from gas_lightning.callbacks.previews import EditPreviews
from gas_lightning.callbacks.progress import StepProgressBar

__all__ = ["EditOutputs", "FinalCheckpoint", "EditPreviews", "NanGuard", "NullTextPenalty", "StepProgressBar"]
