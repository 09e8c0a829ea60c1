"""The output every model returns (and the batch it reads, defined in ``ehrcxr.batch``)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ehrcxr.batch import Batch

__all__ = ["Batch", "ModelOutput"]


@dataclass
class ModelOutput:
    """Logits (B, L) used for the task loss and prediction, plus weighted auxiliary losses."""

    logits: torch.Tensor
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
