"""Pair-Matching (PM) loss: an auxiliary hyperplane that separates matching from non-matching pairs.

SiCLIP (Liu 2024) adds a binary pair classifier, weight 0.1; its formula is not public. Reading chosen
(``paper_math.md`` §6 #6): on unit-norm embeddings v (image) and t (text)::

    hyperplane:  z(v, t) = wᵀ(v ⊙ t) + b         (w = s·1 gives s·cos(v, t) + b)
    cosine:      z(v, t) = s·cos(v, t) + b,  s = exp(s')

Positives are the batch diagonal. For each positive, ``negatives`` in-batch negatives are mined per
direction (texts for each image, images for each text): the hardest by cosine similarity, or sampled
with probability ∝ softmax(similarity / τ) as in ALBEF; the selection is not differentiated. The loss
is binary cross-entropy, balanced so positives and negatives weigh equally::

    L = ½·mean_pos BCE(z, 1) + ½·mean_neg BCE(z, 0)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .validation import check_pair

MINING = ("hard", "sampled")
FORMS = ("hyperplane", "cosine")


class PairMatchingLoss(nn.Module):
    MIN_PAIRS = 2  # a negative is another pair of the batch

    def __init__(
        self,
        embed_dim: int,
        *,
        form: str = "hyperplane",
        mining: str = "hard",
        negatives: int = 1,
        temperature: float = 0.1,
        balanced: bool = True,
        init_scale: float = 10.0,
        init_bias: float = -5.0,
    ) -> None:
        super().__init__()
        if form not in FORMS:
            raise ValueError(f"unknown pair-matching form {form!r}; choose one of {FORMS}")
        if mining not in MINING:
            raise ValueError(f"unknown negative mining {mining!r}; choose one of {MINING}")
        if negatives < 1:
            raise ValueError(f"negatives per positive must be at least 1, got {negatives}")
        self.form, self.mining, self.negatives = form, mining, negatives
        self.temperature, self.balanced = temperature, balanced
        if form == "hyperplane":
            self.weight = nn.Parameter(torch.full((embed_dim,), float(init_scale)))
        else:
            self.log_scale = nn.Parameter(torch.tensor(math.log(init_scale)))
        self.bias = nn.Parameter(torch.tensor(float(init_bias)))

    def score(self, image: Tensor, text: Tensor) -> Tensor:
        """Logits z for aligned rows of ``image`` and ``text`` (both ``(n, dim)``)."""
        if self.form == "hyperplane":
            return (image * text) @ self.weight + self.bias
        return self.log_scale.exp() * (image * text).sum(-1) + self.bias

    @torch.no_grad()
    def mine(self, similarity: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Indices ``(n, k)`` of negatives for each row of ``similarity`` (diagonal excluded)."""
        n = similarity.shape[0]
        k = min(self.negatives, n - 1)
        masked = similarity.masked_fill(torch.eye(n, dtype=torch.bool, device=similarity.device), float("-inf"))
        if self.mining == "hard":
            return masked.topk(k, dim=1).indices
        probs = torch.softmax(masked / self.temperature, dim=1)
        return torch.multinomial(probs, k, replacement=False, generator=generator)

    def forward(self, image_features: Tensor, text_features: Tensor, generator: torch.Generator | None = None) -> Tensor:
        check_pair(image_features, text_features)
        n = image_features.shape[0]
        if n < self.MIN_PAIRS:
            raise ValueError(f"pair matching needs at least {self.MIN_PAIRS} pairs in a batch to find negatives, got {n}")
        similarity = image_features.detach() @ text_features.detach().T
        text_for_image = self.mine(similarity, generator)  # (n, k)
        image_for_text = self.mine(similarity.T, generator)
        rows = torch.arange(n, device=image_features.device)[:, None].expand_as(text_for_image)
        positive = self.score(image_features, text_features)
        negative = torch.cat([
            self.score(image_features[rows.reshape(-1)], text_features[text_for_image.reshape(-1)]),
            self.score(image_features[image_for_text.reshape(-1)], text_features[rows.reshape(-1)]),
        ])  # fmt: skip
        pos_loss = F.binary_cross_entropy_with_logits(positive, torch.ones_like(positive), reduction="sum")
        neg_loss = F.binary_cross_entropy_with_logits(negative, torch.zeros_like(negative), reduction="sum")
        if self.balanced:
            return 0.5 * pos_loss / positive.numel() + 0.5 * neg_loss / negative.numel()
        return (pos_loss + neg_loss) / (positive.numel() + negative.numel())

    @torch.no_grad()
    def predict(self, image_features: Tensor, text_features: Tensor) -> Tensor:
        """Match probability of every image–text combination, ``(n_images, n_texts)``."""
        if self.form == "hyperplane":
            logits = (image_features * self.weight) @ text_features.T + self.bias
        else:
            logits = self.log_scale.exp() * image_features @ text_features.T + self.bias
        return torch.sigmoid(logits)
