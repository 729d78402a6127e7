"""Image captioners a user holds, as siclip captioners: ``captioner(images, seed=None) -> list[list[str]]`` over
``(H, W, 3)`` uint8 images, ``settings.num_captions`` captions each (:mod:`siclip.data.captioning` writes them).

    captioner = load_captioner("hf:models/blip-base", CaptionSettings(num_captions=5, temperature=1.0, top_p=0.9))
    captioner = load_captioner("open_clip:coca_ViT-L-14:coca.pt", CaptionSettings(num_captions=1, temperature=0))

- ``hf:DIR``: any transformers image-to-text model saved in ``DIR`` (BLIP, GIT, BLIP-2, …), read
  through the library's auto classes (``AutoProcessor``, ``AutoModelForImageTextToText``) with ``local_files_only=True``
  and ``trust_remote_code=False``, after the checks every transformers load passes (:mod:`siclip.interop.safety`: no
  ``auto_map``, a model type transformers ships, readable weights that fit the config, a bounded size): nothing is
  downloaded and no code from the directory runs. Captions come from ``model.generate`` (``num_return_sequences`` =
  the captions per image).
- ``open_clip:ARCH:FILE``: open_clip's CoCa (``ARCH`` a ``coca_*`` architecture or a model-config JSON, ``FILE`` its
  weights), loaded as every open_clip model is (the config checked: no hub tower or tokenizer, bounded sizes), its
  images in the model's own preprocessing. Decoding runs on CoCa's own forward, the logits its
  ``generate`` samples from: open_clip's ``generate`` needs transformers' ``BeamSearchScorer``, which transformers 5
  removed, so siclip samples itself (below) and needs no transformers for CoCa.

Sampling (both): each step's next-token logits ``z``; temperature 0 takes ``argmax z`` (greedy, one caption per image);
otherwise ``p = softmax(z / T)`` restricted to the smallest set of tokens whose probability reaches ``top_p``,
renormalised, and one token drawn. ``seed`` seeds the draws of one call (torch's global generator, which transformers'
sampling uses). On CUDA the models run under bf16 autocast.
"""

from __future__ import annotations

import contextlib
import importlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.nn import functional as F

from siclip.data.captioning import CaptionSettings
from siclip.data.transforms import preprocess_image
from siclip.errors import require

CAPTIONER_SPECS = "hf:DIR (a transformers image-to-text model), open_clip:ARCH:FILE (open_clip's CoCa)"


def _device(name: str) -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else torch.device(name)


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def _seeded(seed: int | None) -> None:
    if seed is not None:
        torch.manual_seed(seed)


def is_captioner_spec(spec: str) -> bool:
    return spec.startswith(("hf:", "open_clip:"))


def check_captioner_spec(spec: str) -> str:
    """``spec`` when what it names is there (checked before anything loads); else ``FileNotFoundError``/``ValueError``.
    A folder naming code, a hub name or an absurd size is refused by :mod:`siclip.interop.safety` when it loads."""
    scheme, _, rest = spec.partition(":")
    if scheme == "hf":
        if not (Path(rest) / "config.json").is_file():
            from .safety import looks_like_hub_name

            hub = " (siclip reads local folders only and downloads nothing)" if looks_like_hub_name(rest) else ""
            raise FileNotFoundError(f"{spec}: {rest} is not a saved transformers model (no config.json there){hub}")
    elif scheme == "open_clip":
        arch, sep, weights = rest.rpartition(":")
        if not sep or not arch:
            raise ValueError(f"{spec}: expected open_clip:ARCH:FILE (a coca_* architecture or model-config JSON, and a weights file)")
        if not Path(weights).is_file():
            raise FileNotFoundError(f"{spec}: weights file {weights} not found")
    else:
        raise ValueError(f"{spec}: expected {CAPTIONER_SPECS}")
    return spec


def load_captioner(spec: str, settings: CaptionSettings, device: str = "auto"):
    """The captioner ``spec`` names (see the module docstring)."""
    check_captioner_spec(spec)
    scheme, _, rest = spec.partition(":")
    if scheme == "hf":
        return TransformersCaptioner(rest, settings, device, spec)
    return CocaCaptioner(rest, settings, device, spec)


class TransformersCaptioner:
    """A transformers image-to-text model as a captioner (``hf:DIR``)."""

    def __init__(self, directory: str, settings: CaptionSettings, device: str = "auto", spec: str | None = None) -> None:
        require("transformers", "transformers", f"captioner {spec or directory}")
        spec = spec or f"hf:{directory}"
        # Through siclip.interop.transformers, so through siclip.interop.safety: no code of the folder's, nothing fetched.
        model, self.processor = importlib.import_module("siclip.interop.transformers").load_image_to_text(directory, spec)
        if not hasattr(self.processor, "batch_decode"):
            raise ValueError(f"{spec}: the saved processor ({type(self.processor).__name__}) prepares images but cannot decode tokens: "
                             "save the model's processor (image processor and tokenizer) with it")  # fmt: skip
        self.device = _device(device)
        self.model = model.eval().to(self.device)
        self.settings, self.spec = settings, spec

    @torch.no_grad()
    def __call__(self, images: list[np.ndarray], seed: int | None = None) -> list[list[str]]:
        s = self.settings
        inputs = self.processor(images=[Image.fromarray(image) for image in images], return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        sampling = {"do_sample": True, "temperature": s.temperature, "top_p": s.top_p, "top_k": 0} if s.temperature > 0 else {"do_sample": False}
        _seeded(seed)
        with _autocast(self.device):
            ids = self.model.generate(**inputs, max_new_tokens=s.max_new_tokens, num_return_sequences=s.num_captions, num_beams=1, **sampling)
        texts = [" ".join(t.split()) for t in self.processor.batch_decode(ids, skip_special_tokens=True)]
        return [texts[i * s.num_captions : (i + 1) * s.num_captions] for i in range(len(images))]


class CocaCaptioner:
    """open_clip's CoCa as a captioner (``open_clip:ARCH:FILE``), decoded on its own forward (module docstring)."""

    def __init__(self, rest: str, settings: CaptionSettings, device: str = "auto", spec: str | None = None) -> None:
        require("open_clip", "open_clip_torch", f"captioner {spec or rest}")
        open_clip_interop = importlib.import_module("siclip.interop.open_clip")
        open_clip = importlib.import_module("open_clip")
        spec = spec or f"open_clip:{rest}"
        model = open_clip_interop.load_original(rest, spec)
        if not isinstance(model, open_clip.CoCa):
            raise ValueError(f"{spec}: a {type(model).__name__}, not a CoCa: captions come from open_clip's coca_* architectures")
        # The architecture's tokenizer as siclip builds it (its arguments checked: no file read from elsewhere, nothing
        # fetched), not open_clip.get_tokenizer, which would follow whatever the config names.
        self.tokenizer = open_clip_interop.original_tokenizer(model, rest).tokenizer
        self.preprocess = open_clip_interop.preprocess_of(model)
        self.device = _device(device)
        self.model = model.eval().to(self.device)
        self.context = min(self.model.context_length, self.model.text.context_length)  # the decoder's and the text tower's
        self.sot, self.eot = self.tokenizer.sot_token_id, self.tokenizer.eot_token_id
        self.settings, self.spec = settings, spec

    @torch.no_grad()
    def __call__(self, images: list[np.ndarray], seed: int | None = None) -> list[list[str]]:
        s = self.settings
        pixels = torch.stack([preprocess_image(image, self.preprocess) for image in images]).to(self.device)
        pixels = pixels.repeat_interleave(s.num_captions, dim=0)  # (images · captions, 3, H, W): caption c of image i at i·K + c
        _seeded(seed)
        with _autocast(self.device):
            tokens = self.decode(pixels)
        texts = [self._text(row) for row in tokens.tolist()]
        return [texts[i * s.num_captions : (i + 1) * s.num_captions] for i in range(len(images))]

    def decode(self, pixels: Tensor) -> Tensor:
        """``(n, length)`` token ids: start-of-text, then one token a step until end-of-text or the length limit
        (``max_new_tokens``, within the text context); finished rows are padded with end-of-text."""
        s = self.settings
        image_latent, image_embs = self.model._encode_image(pixels)
        out = torch.full((pixels.shape[0], 1), self.sot, dtype=torch.long, device=pixels.device)
        done = torch.zeros(pixels.shape[0], dtype=torch.bool, device=pixels.device)
        for _ in range(min(s.max_new_tokens, self.context - 1)):
            logits = self.model(pixels, out, image_latent=image_latent, image_embs=image_embs, output_labels=False)["logits"][:, -1].float()
            token = next_token(logits, s.temperature, s.top_p)
            token = torch.where(done, torch.full_like(token, self.eot), token)
            out = torch.cat([out, token[:, None]], dim=1)
            done |= token == self.eot
            if bool(done.all()):
                break
        return out

    def _text(self, ids: list[int]) -> str:
        body = ids[1:]
        body = body[: body.index(self.eot)] if self.eot in body else body
        return " ".join(self.tokenizer.decode(body).split())


def nucleus(logits: Tensor, temperature: float, top_p: float) -> Tensor:
    """``(n, vocab)`` sampling distributions from next-token logits: ``p = softmax(z / T)`` kept to its top-``top_p``
    nucleus (the most probable tokens, in order, while the probability of those ranked above stays below ``top_p``, so
    the most probable token always stays), renormalised."""
    probs = F.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    above = sorted_probs.cumsum(dim=-1) - sorted_probs  # probability of the tokens ranked above each one
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(above >= top_p, 0.0))
    return kept / kept.sum(dim=-1, keepdim=True)


def next_token(logits: Tensor, temperature: float, top_p: float) -> Tensor:
    """One token per row of ``(n, vocab)`` logits: ``argmax`` when ``temperature`` is 0, else a draw from
    :func:`nucleus`."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    return torch.multinomial(nucleus(logits, temperature, top_p), 1).squeeze(-1)
