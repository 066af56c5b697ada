"""Score-distillation guidance: grounded DDS terms and the CDS shape-preserving loss."""

from gas_lightning.guidance.cds import CDSConfig
from gas_lightning.guidance.dds import GroundedScoreGuidance, GuidanceConfig, Term, TermLog, shielded_term

__all__ = ["CDSConfig", "GroundedScoreGuidance", "GuidanceConfig", "Term", "TermLog", "shielded_term"]
