"""Pluggable normalisation layers for token blocks ``(batch, tokens, dim)``.

``"batchnorm"`` is BatchNorm over the channel axis of tokens: on tokens flattened from a
``(batch, channels, height, width)`` map it computes exactly ``nn.BatchNorm2d``, with the same state-dict
keys, which is the pre-norm of MobileCLIP's image attention blocks.
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

NormSpec = str | Callable[[int], nn.Module]


class TokenBatchNorm(nn.BatchNorm1d):
    """BatchNorm over the last (channel) axis of ``(..., dim)`` tokens; statistics over all other axes."""

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.num_features:
            raise ValueError(f"TokenBatchNorm expects {self.num_features} channels last, got shape {tuple(x.shape)}")
        return super().forward(x.reshape(-1, x.shape[-1])).view(x.shape)


NORM_LAYERS: dict[str, Callable[..., nn.Module]] = {
    "layernorm": nn.LayerNorm,
    "rmsnorm": nn.RMSNorm,
    "batchnorm": TokenBatchNorm,
    "identity": lambda dim, **_: nn.Identity(),
}


def create_norm(norm: NormSpec, dim: int, eps: float | None = None) -> nn.Module:
    """Build a norm from a name in :data:`NORM_LAYERS` or any callable ``dim -> module``."""
    if callable(norm):
        return norm(dim)
    try:
        factory = NORM_LAYERS[norm.lower()]
    except KeyError:
        raise ValueError(f"unknown norm {norm!r}; choose one of {sorted(NORM_LAYERS)} or pass a callable") from None
    return factory(dim) if eps is None else factory(dim, eps=eps)
