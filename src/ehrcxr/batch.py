"""The batch contract between the data stage and the models: one mini-batch of ICU stays."""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class Batch:
    """One mini-batch of ICU stays.

    ehr:        (B, T, C) float — EHR values + observation masks (76 features by default)
    ehr_mask:   (B, T, V) float — 1 where variable v was observed in hour t
    ehr_length: (B,) long      — number of valid hours (>= 1); steps beyond are padding
    cxr:        (B, 1, H, W) float — standardised image, zeros where has_cxr == 0 (or frozen-prefix features);
                StaySet.collate serves uint8 pixels, ehrcxr.train.loop.prepare_batch converts them on the device
    has_cxr:    (B,) float     — 1 if the stay has a usable paired X-ray
    cxr_hours:  (B,) float     — hours from the X-ray to the prediction time (0 where missing)
    labels:     (B, L) float   — targets (L = 1 for mortality, 25 for phenotyping)
    stay_id:    (B,) long
    """

    ehr: torch.Tensor
    ehr_mask: torch.Tensor
    ehr_length: torch.Tensor
    cxr: torch.Tensor
    has_cxr: torch.Tensor
    cxr_hours: torch.Tensor
    labels: torch.Tensor
    stay_id: torch.Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        """Move every tensor to ``device``."""
        return Batch(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)})

    def pin_memory(self) -> "Batch":
        """Pin every tensor (DataLoader calls this when pin_memory=True)."""
        return Batch(**{f.name: getattr(self, f.name).pin_memory() for f in fields(self)})

    def __len__(self) -> int:
        return int(self.labels.shape[0])
