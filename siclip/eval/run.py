"""Run the evaluations on a model: on the embedded sets, or on any source through the readers.

``model`` is any CLIP with siclip's interface (:mod:`siclip.interop`): ``encode_image``, ``encode_text`` and
``preprocess``, its own view of an image (resize, centre crop, mean and std), which every image goes through here.
"""

from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Callable

import torch
from torch import Tensor

from siclip.data import EmbeddedConfig, EmbeddedSource, decode_image, retrieval_set, zero_shot_prompts
from siclip.data.transforms import preprocess_image

from .metrics import recall_at_k, topk_accuracy, zero_shot_weights


def _first_tensor(model) -> Tensor:
    """The model's first parameter, or its first buffer (a model run by another runtime holds no parameters)."""
    return next(itertools.chain(model.parameters(), model.buffers()))


def _device(model) -> torch.device:
    return _first_tensor(model).device


def _dtype(model) -> torch.dtype:
    return _first_tensor(model).dtype  # a half or double model gets images it can take


# Per item, CPU inference is fastest at a few images (or some 64 texts) per call. Mostly because glibc's malloc
# unmaps a large batch's activations after each pass and faults them in again on the next: MobileCLIP-S0 on a
# 2-core VM took 28 ms per image at batch 4 and 72 ms at 64 with its defaults, 20 and 23 ms with
# siclip.train.malloc.keep_freed_memory (which the command-line scripts call); texts 12.5 against 14.5 ms at 64
# and 256, 11.2 and 11.1 ms. Chunks of 4 images and 64 texts are the fastest either way (benchmarks/RESULTS.md,
# session 7). A GPU wants the batch whole.
CPU_CHUNK = {"image": 4, "text": 64}


def encode_on(device: torch.device, encode, inputs: Tensor, kind: str, dtype: torch.dtype | None = None) -> Tensor:
    """``encode(inputs)`` on ``device`` (images in the model's ``dtype``); on a CPU, in chunks of
    ``CPU_CHUNK[kind]`` rows (the same rows, faster)."""
    inputs = inputs.to(device, dtype)
    chunk = CPU_CHUNK[kind]
    if device.type != "cpu" or len(inputs) <= chunk:
        return encode(inputs)
    return torch.cat([encode(part) for part in inputs.split(chunk)])


def image_encoder(model) -> Callable[[list], Tensor]:
    """``encode(images)``: unit-norm embeddings of ``(H, W, 3)`` uint8 images in the model's own evaluation view
    (``model.preprocess``), computed on the model's device and returned on the CPU."""
    device, dtype, view = _device(model), _dtype(model), model.preprocess

    @torch.no_grad()
    def encode(images: list) -> Tensor:
        return encode_on(device, model.encode_image, torch.stack([preprocess_image(image, view) for image in images]), "image", dtype).float().cpu()

    return encode


def text_encoder(model, tokenizer) -> Callable[[list[str]], Tensor]:
    """``encode(texts)``: unit-norm embeddings of captions through the model's own tokenizer, returned on the CPU."""
    device = _device(model)

    @torch.no_grad()
    def encode(texts: list[str]) -> Tensor:
        return encode_on(device, model.encode_text, tokenizer(texts), "text").float().cpu()

    return encode


@torch.no_grad()
def embed_source(model, source, indices=None, *, batch_size: int = 256) -> Tensor:
    """Unit-norm image embeddings of ``source`` in the model's own evaluation view (``model.preprocess``),
    computed on the model's device."""
    device, dtype, view = _device(model), _dtype(model), model.preprocess
    indices = range(len(source)) if indices is None else indices
    out, batch = [], []
    for i in indices:
        sample = source.load(i)
        batch.append(preprocess_image(decode_image(sample.image, sample.key), view))
        if len(batch) == batch_size:
            out.append(encode_on(device, model.encode_image, torch.stack(batch), "image", dtype))
            batch = []
    if batch:
        out.append(encode_on(device, model.encode_image, torch.stack(batch), "image", dtype))
    return torch.cat(out)


@torch.no_grad()
def zero_shot_logits(model, tokenizer, source, classnames, templates, *, batch_size: int = 256) -> Tensor:
    """``(images, classes)`` cosine similarities between the images and the template-ensemble classifier."""
    device = _device(model)
    weights = zero_shot_weights(lambda texts: encode_on(device, model.encode_text, tokenizer(texts), "text"), classnames, templates)
    images = embed_source(model, source, batch_size=batch_size)
    return images.float() @ weights.T


@torch.no_grad()
def zero_shot_eval(model, tokenizer, source, labels: Tensor, classnames, templates, *, per_item: bool = False) -> dict:
    logits = zero_shot_logits(model, tokenizer, source, classnames, templates)
    return topk_accuracy(logits, labels.to(logits.device), per_item=per_item)


@torch.no_grad()
def retrieval_eval(model, tokenizer, source, captions: list[list[str]], *, batch_size: int = 256, per_item: bool = False,
                   ties: bool = False) -> dict:  # fmt: skip
    device = _device(model)
    images = embed_source(model, source, batch_size=batch_size)
    flat = [c for caps in captions for c in caps]
    owner = torch.tensor([i for i, caps in enumerate(captions) for _ in caps])
    texts = torch.cat([encode_on(device, model.encode_text, tokenizer(flat[i : i + 512]), "text") for i in range(0, len(flat), 512)])
    return recall_at_k(images, texts, owner.to(images.device), per_item=per_item, ties=ties)


def evaluate_embedded(
    model, tokenizer, config: EmbeddedConfig = EmbeddedConfig(), *, retrieval_images: int = 500, per_item: bool = False
) -> dict:
    """Zero-shot top-1/top-5 on the embedded classes and retrieval R@1/5/10 on held-out test images.

    ``per_item``: each metric as the boolean outcome of every item (zero-shot image, retrieval image or
    caption), whose mean is the metric: what seed-and-item bootstrap intervals resample."""
    was_training = model.training
    model.eval()
    zs = EmbeddedSource(config, "zeroshot")
    classnames, templates = zero_shot_prompts()
    labels = torch.tensor([zs.label(i) for i in range(len(zs))])
    metrics = {f"zeroshot_{k}": v for k, v in zero_shot_eval(model, tokenizer, zs, labels, classnames, templates, per_item=per_item).items()}
    source, captions = retrieval_set(replace(config, num_test=min(retrieval_images, config.num_test)), "test")
    metrics |= retrieval_eval(model, tokenizer, source, captions, per_item=per_item)
    model.train(was_training)
    return metrics
