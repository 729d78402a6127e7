"""Teachers: anything that gives unit-norm image and text features and a logit scale.

- :class:`FrozenTeacher` wraps a model of this package (MobileCLIP-S0 from Apple's weights, or any saved
  checkpoint): eval mode, no gradients, no stored activations.
- :class:`CachedTeacher` reads the embeddings a batch carries from a teacher cache
  (:mod:`siclip.data.teacher_cache`), so training skips the teacher's forward pass.
- :class:`OpenClipTeacher` wraps an ``open_clip`` model when that package is installed (weights from a
  local file only; nothing is downloaded).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

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
    def from_checkpoint(cls, path: str | Path) -> FrozenTeacher:
        """A checkpoint of this package, or Apple's ``mobileclip_s0.pt`` (recognised by its keys)."""
        from siclip.models import load_model

        return cls(load_model(path)[0])

    @torch.no_grad()
    def forward(self, batch: dict) -> TeacherOutput:
        image = self.model.encode_image(batch["image"])
        text = self.model.encode_text(batch["text"])
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


class OpenClipTeacher(nn.Module):
    """An ``open_clip`` model as teacher; ``pretrained`` must be a local weights file."""

    def __init__(self, model_name: str, pretrained: str | Path, tokenizer=None) -> None:
        super().__init__()
        try:
            import open_clip
        except ImportError as err:
            raise ImportError("OpenClipTeacher needs the optional open_clip_torch package") from err
        if not Path(pretrained).is_file():
            raise FileNotFoundError(f"open_clip weights must be a local file (nothing is downloaded): {pretrained}")
        self.model, _, _ = open_clip.create_model_and_transforms(model_name, pretrained=str(pretrained))
        self.model.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, batch: dict) -> TeacherOutput:
        image = F.normalize(self.model.encode_image(batch["image"]), dim=-1)
        text = F.normalize(self.model.encode_text(batch["text"]), dim=-1)
        return image, text, self.model.logit_scale.exp()
