"""Evaluation metrics on embeddings (CLIP_benchmark's protocol).

- Zero-shot classifier: for each class, embed every prompt template, normalise each embedding, average,
  normalise again; classify by the largest cosine.
- Retrieval recall@k: image→text counts an image as found when **any** of its captions ranks in the top
  k; text→image when its image ranks in the top k.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from einops import rearrange
from torch import Tensor
from torch.nn import functional as F


@torch.no_grad()
def zero_shot_weights(encode_text: Callable[[list[str]], Tensor], classnames: Sequence[str], templates: Sequence[str], *,
                      prompts_per_call: int = 1024) -> Tensor:  # fmt: skip
    """``(classes, dim)`` unit-norm class embeddings from a template ensemble: ``w_c = normalize(mean_t normalize(f(t(c))))``.

    The prompts of as many whole classes as fit in ``prompts_per_call`` go to ``encode_text`` together (ImageNet's 1,000
    classes are a few dozen calls, not 1,000)."""
    classes_per_call = max(1, prompts_per_call // len(templates))
    weights = []
    for start in range(0, len(classnames), classes_per_call):
        names = classnames[start : start + classes_per_call]
        embeddings = F.normalize(encode_text([t.format(name) for name in names for t in templates]).float(), dim=-1)
        per_class = rearrange(embeddings, "(classes templates) dim -> classes templates dim", templates=len(templates))
        weights.append(F.normalize(per_class.mean(dim=1), dim=-1))
    return torch.cat(weights)


def topk_accuracy(logits: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5), *, per_item: bool = False) -> dict:
    """Fraction of rows whose label is among the ``k`` largest logits, ``k`` capped at the class count
    (``per_item``: the boolean hit of each row)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return {f"top{k}": _reduce(hits[:, :k].any(1), per_item) for k in ks}


def per_class_accuracy(logits: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """``(classes,)`` top-1 accuracy within each class (its recall); NaN for a class with no sample.

    ``acc_c = #{i : label_i = c, argmax_i = c} / #{i : label_i = c}``; their mean over the classes
    present is CLIP_benchmark's ``mean_per_class_recall``.
    """
    predicted = logits.argmax(dim=1)
    totals = torch.bincount(labels, minlength=num_classes).double()
    correct = torch.bincount(labels[predicted == labels], minlength=num_classes).double()
    return torch.where(totals > 0, correct / totals.clamp(min=1), torch.full_like(totals, float("nan")))


def _reduce(hits: Tensor, per_item: bool):
    return hits.cpu() if per_item else hits.float().mean().item()


def tied_at_cut(similarity: Tensor, k: int) -> int:
    """Rows whose k-th and (k+1)-th largest scores are equal: their recall@k depends on the order of tied scores
    (many images sharing one caption give exactly equal caption embeddings)."""
    if similarity.shape[1] <= k:
        return 0
    top = similarity.topk(k + 1, dim=1).values
    return int((top[:, k - 1] == top[:, k]).sum())


def recall_at_k(
    image_features: Tensor, text_features: Tensor, text_to_image: Tensor, ks: Sequence[int] = (1, 5, 10), *, per_item: bool = False,
    ties: bool = False,
) -> dict:  # fmt: skip
    """Retrieval recall@k both ways; ``text_to_image[j]`` is the image that caption ``j`` describes.
    ``per_item``: the boolean hit of each image (image→text) and each caption (text→image) instead of the means.
    ``ties``: also ``{image_to_text,text_to_image}_ties@k``, the queries :func:`tied_at_cut` finds."""
    similarity = image_features.float() @ text_features.float().T  # (images, texts)
    n_images = image_features.shape[0]
    owner = text_to_image[None, :] == torch.arange(n_images, device=text_to_image.device)[:, None]  # (images, texts): caption j belongs to image i
    out = {}
    for k in ks:
        top_texts = similarity.topk(min(k, similarity.shape[1]), dim=1).indices
        out[f"image_to_text_R@{k}"] = _reduce(owner.gather(1, top_texts).any(1), per_item)
        top_images = similarity.T.topk(min(k, n_images), dim=1).indices
        out[f"text_to_image_R@{k}"] = _reduce((top_images == text_to_image[:, None]).any(1), per_item)
        if ties:
            out[f"image_to_text_ties@{k}"] = tied_at_cut(similarity, k)
            out[f"text_to_image_ties@{k}"] = tied_at_cut(similarity.T, k)
    return out
