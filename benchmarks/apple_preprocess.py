"""Issue 23's figure: how far siclip's old view of a real photo put MobileCLIP-S0 from Apple's own preprocessing.

    python benchmarks/apple_preprocess.py

MobileCLIP-S0 is siclip's (equal to Apple's code to 1e-10 in float64) with random weights: no pretrained file can be
downloaded here. Two settings: the library's initialisation, whose 1e-5 layer scales make a nearly constant encoder,
and the same with every layer scale at 1 (trained MobileCLIP layer scales are of order 0.1–1), where the embedding
depends on its input. For scikit-learn's sample photos it embeds three views:

- **Apple's**: torchvision ``Resize(256)`` (PIL bilinear, short side) → ``CenterCrop(256)`` → ``ToTensor()``, written
  out with PIL (as ``tests/test_preprocess.py`` does);
- **siclip before**: the view every model got until models carried their preprocessing: centre square cropped first,
  resized in torch, normalised with CLIP's mean and std (``augment(..., AugmentConfig(256, train=False))``);
- **siclip now**: the model's own view (``preprocess_image(image, model.preprocess)``);

and prints the cosine between each siclip embedding and Apple's, and the pixel ranges.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_sample_image
from torch.nn import functional as F

from siclip.data import AugmentConfig, augment, preprocess_image
from siclip.models import create_model


def apple_view(image: np.ndarray, size: int = 256) -> torch.Tensor:
    pil = Image.fromarray(image)
    w, h = pil.size
    pil = pil.resize((size, int(size * h / w)) if w <= h else (int(size * w / h), size), Image.BILINEAR)
    w, h = pil.size
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return torch.from_numpy(np.asarray(pil.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0).permute(2, 0, 1)


@torch.no_grad()
def main() -> int:
    print("| weights | photo | view | pixel range | cosine to Apple's embedding |\n|---|---|---|---|---:|")
    for weights in ("initial (layer scales 1e-5)", "layer scales 1"):
        torch.manual_seed(0)
        model = create_model("mobileclip_s0").eval()
        if weights == "layer scales 1":
            for name, p in model.named_parameters():
                if "layer_scale" in name:
                    p.fill_(1.0)
        references = []
        for name in ("china.jpg", "flower.jpg"):
            image = load_sample_image(name)
            views = {"Apple's (reference)": apple_view(image), "siclip before": augment(image, None, AugmentConfig(256, train=False)),
                     "siclip now": preprocess_image(image, model.preprocess)}  # fmt: skip
            embedded = {k: F.normalize(model.encode_image(v[None]), dim=-1)[0] for k, v in views.items()}
            references.append(embedded["Apple's (reference)"])
            for view, pixels in views.items():
                cosine = float(embedded[view] @ references[-1])
                print(f"| {weights} | {name} | {view} | [{pixels.min():.3f}, {pixels.max():.3f}] | {cosine:.7f} |")
        print(f"| {weights} | china.jpg against flower.jpg | Apple's | | {float(references[0] @ references[1]):.7f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
