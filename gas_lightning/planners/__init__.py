"""Planners: turn a user request into an EditPlan (docs/method.md, "Planning")."""

from gas_lightning.planners.request import is_structured_request, parse_request, split_sentences
from gas_lightning.planners.sentences import diff_sentences

__all__ = ["parse_request", "is_structured_request", "split_sentences", "diff_sentences"]
