"""Lightning callbacks of an edit: null-text penalty, previews, final outputs."""

from gas_lightning.callbacks.outputs import EditOutputs, FinalCheckpoint
from gas_lightning.callbacks.nan_guard import NanGuard
from gas_lightning.callbacks.penalty import NullTextPenalty
from gas_lightning.callbacks.previews import EditPreviews

__all__ = ["EditOutputs", "FinalCheckpoint", "EditPreviews", "NanGuard", "NullTextPenalty"]
