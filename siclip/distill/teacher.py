"""Teachers: anything that gives unit-norm image and text features and a logit scale.

- :class:`FrozenTeacher` wraps any CLIP with siclip's interface (:mod:`siclip.interop`: a model of this package,
  MobileCLIP-S0 from Apple's weights, a transformers or open_clip CLIP through its adapter): eval mode, no
  gradients, no stored activations, and its own pixels: the batch's uint8 crops resized to its input size and
  normalised with its mean and std, and its own token ids (``batch["teacher_ids"]``) when its tokenizer is not the
  student's.
- :class:`CachedTeacher` reads the embeddings a batch carries from a teacher cache
  (:mod:`siclip.data.teacher_cache`), so training skips the teacher's forward pass.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from siclip.data import model_pixels

TeacherOutput = tuple[Tensor, Tensor, Tensor]


class FrozenTeacher(nn.Module):
    """``model`` in eval mode with every parameter frozen.

    ``reparameterize`` fuses its train-time branches into single convolutions first (in place): the same
    function in fewer, larger kernels, which a teacher that only runs forward can always afford.
    """

    def __init__(self, model: nn.Module, *, reparameterize: bool = False) -> None:
        super().__init__()
        self.model = model.eval()
        if reparameterize:
            from siclip.models import reparameterize_model

            reparameterize_model(self.model, inplace=True)
        for p in self.model.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> FrozenTeacher:  # a teacher stays in eval mode (BatchNorm statistics)
        return super().train(False)

    @classmethod
    def from_checkpoint(cls, spec: str | Path) -> FrozenTeacher:
        """The CLIP a model spec names (:func:`siclip.interop.load_clip`): a checkpoint of this package, Apple's
        ``mobileclip_s0.pt`` (recognised by its keys), ``hf:DIR`` or ``open_clip:ARCH:FILE``."""
        from siclip.interop import load_clip

        return cls(load_clip(spec).model)

    @torch.no_grad()
    def forward(self, batch: dict) -> TeacherOutput:
        image = self.model.encode_image(model_pixels(batch["image"], self.model.preprocess))
        text = self.model.encode_text(batch.get("teacher_ids", batch["text"]))
        return image, text, self.model.scale()


class CachedTeacher(nn.Module):
    """Teacher features from ``batch["teacher_image"]`` / ``batch["teacher_text"]`` (a teacher cache)."""

    def __init__(self, logit_scale: float) -> None:
        super().__init__()
        self.register_buffer("logit_scale", torch.tensor(float(logit_scale)))

    @classmethod
    def from_cache(cls, cache) -> CachedTeacher:
        """With the teacher's logit scale recorded in the cache's ``meta.json``."""
        scale = cache.meta.get("logit_scale")
        if scale is None:
            raise ValueError(f"the teacher cache at {cache.path} records no logit scale; pass CachedTeacher(scale)")
        return cls(scale)

    def forward(self, batch: dict) -> TeacherOutput:
        if "teacher_image" not in batch:
            raise KeyError("the batch carries no teacher embeddings: build the dataset with teacher_cache=TeacherCache(path)")
        return batch["teacher_image"], batch["teacher_text"], self.logit_scale
