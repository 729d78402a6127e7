"""The three distillation terms of WIKD (SiCLIP), as CLIP-KD (Yang et al., CVPR 2024) defines them.

Student features v_S, s_S and teacher features v_T, s_T are unit-norm image and text embeddings.

- **FD**, feature distillation: ``MSE(v̂_S, v_T) + MSE(ŝ_S, s_T)`` (mean over batch × dim), where
  ``x̂ = normalize(W x)`` with a learned linear map W only when the widths differ. SiCLIP weight 4000.
- **CRD**, contrastive relation distillation: ``½[KL(p_T^{i→t} ‖ p_S^{i→t}) + KL(p_T^{t→i} ‖ p_S^{t→i})]``,
  rows of ``softmax(τ·V Tᵀ)`` with each model's own logit scale τ, ``batchmean`` reduction. Weight 1.
- **ICL**, interactive contrastive learning: student anchors against teacher candidates,
  ``½[CE(κ·v_S s_Tᵀ, I) + CE(κ·s_S v_Tᵀ, I)]`` with its own learnable κ. Weight 1. CLIP-KD's code uses κ
  as is (initialised to ln(1/0.07) ≈ 2.66, not exponentiated): ``scale="raw"`` reproduces that,
  ``scale="exp"`` uses exp(κ) like a CLIP temperature.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from siclip.losses.clip_loss import clip_logits
from siclip.losses.validation import check_pair


class FeatureDistillation(nn.Module):
    def __init__(self, student_dim: int, teacher_dim: int) -> None:
        super().__init__()
        self.image_proj = nn.Linear(student_dim, teacher_dim) if student_dim != teacher_dim else None
        self.text_proj = nn.Linear(student_dim, teacher_dim) if student_dim != teacher_dim else None

    def _match(self, x: Tensor, proj: nn.Linear | None) -> Tensor:
        return F.normalize(proj(x), dim=-1) if proj is not None else x

    def forward(self, student_image: Tensor, student_text: Tensor, teacher_image: Tensor, teacher_text: Tensor) -> Tensor:
        check_pair(student_image, student_text, ("student image", "student text"))
        check_pair(teacher_image, teacher_text, ("teacher image", "teacher text"))
        check_pair(student_image, teacher_image, ("student image", "teacher image"), same_width=False)
        v = self._match(student_image, self.image_proj)
        s = self._match(student_text, self.text_proj)
        if v.shape[1] != teacher_image.shape[1]:
            raise ValueError(f"student width {v.shape[1]} does not match the teacher's {teacher_image.shape[1]}")
        return F.mse_loss(v, teacher_image) + F.mse_loss(s, teacher_text)


def _kl_rows(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """KL(softmax(teacher) ‖ softmax(student)) summed over columns, averaged over rows."""
    return F.kl_div(F.log_softmax(student_logits, dim=1), F.log_softmax(teacher_logits, dim=1), reduction="batchmean", log_target=True)


class ContrastiveRelationDistillation(nn.Module):
    def forward(
        self, student_image: Tensor, student_text: Tensor, student_scale, teacher_image: Tensor, teacher_text: Tensor, teacher_scale
    ) -> Tensor:
        check_pair(student_image, student_text, ("student image", "student text"))
        check_pair(teacher_image, teacher_text, ("teacher image", "teacher text"))
        check_pair(student_image, teacher_image, ("student image", "teacher image"), same_width=False)
        s_i2t, s_t2i = clip_logits(student_image, student_text, student_scale)
        t_i2t, t_t2i = clip_logits(teacher_image, teacher_text, teacher_scale)
        return (_kl_rows(t_i2t, s_i2t) + _kl_rows(t_t2i, s_t2i)) / 2


class InteractiveContrastiveLoss(nn.Module):
    def __init__(self, init_scale: float = math.log(1 / 0.07), scale: str = "raw") -> None:
        super().__init__()
        if scale not in ("raw", "exp"):
            raise ValueError(f"scale must be 'raw' (CLIP-KD's code) or 'exp', got {scale!r}")
        self.mode = scale
        self.cross_logit_scale = nn.Parameter(torch.tensor(float(init_scale)))

    def kappa(self) -> Tensor:
        return self.cross_logit_scale if self.mode == "raw" else self.cross_logit_scale.exp().clamp(max=100)

    def forward(self, student_image: Tensor, student_text: Tensor, teacher_image: Tensor, teacher_text: Tensor) -> Tensor:
        check_pair(student_image, teacher_text, ("student image", "teacher text"))
        check_pair(student_text, teacher_image, ("student text", "teacher image"))
        kappa = self.kappa()
        labels = torch.arange(student_image.shape[0], device=student_image.device)
        image_anchored = kappa * student_image @ teacher_text.T
        text_anchored = kappa * student_text @ teacher_image.T
        return (F.cross_entropy(image_anchored, labels) + F.cross_entropy(text_anchored, labels)) / 2
