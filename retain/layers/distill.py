"""Knowledge distillation on logits, and a wrapper that carries per-sample extras through
``training.fit`` (teacher logits, memory labels) to the loss.

``kd_loss`` is PyCIL's ``_KD_loss`` (models/lwf.py, models/icarl.py): the cross-entropy between
the teacher's and the student's temperature-softened distributions, summed over classes and
averaged over the batch, without Hinton's T² factor (Li & Hoiem, LwF, ECCV 2016, Eq. 2).
"""

from __future__ import annotations

import torch
from torch import nn


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """-1/B Σ_b Σ_c softmax(t_b/T)_c · log softmax(s_b/T)_c over (B, C) logits."""
    log_p = torch.log_softmax(student / temperature, dim=1)  # (B, C)
    q = torch.softmax(teacher / temperature, dim=1)  # (B, C)
    return -(q * log_p).sum() / student.shape[0]


class Carry(nn.Module):
    """``Carry(model)(x, extra) = (model(x), extra)``: lets ``fit`` hand a per-sample tensor
    that the inputs produced (e.g. precomputed teacher logits) to ``loss_fn``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, extra: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model(x), extra
