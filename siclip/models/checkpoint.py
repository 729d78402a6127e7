"""Apple's released MobileCLIP-S0 checkpoint (``mobileclip_s0.pt``) → this package's model.

The file is a bare state dict of Apple's ``CLIP`` in train-time form (893 entries). Key mapping,
applied in order (``T`` = number of text transformer layers, 4 for S0):

| Apple | siclip |
|---|---|
| ``image_encoder.model.conv_exp.se.reduce.*`` / ``.expand.*`` | ``visual.conv_exp.se.fc1.*`` / ``.fc2.*`` |
| ``image_encoder.model.*`` | ``visual.*`` (same module names) |
| ``text_encoder.embedding_layer.weight`` | ``text.token_embedding.weight`` |
| ``text_encoder.positional_embedding.pos_embed.pos_embed`` [1, 1, 77, D] | ``text.positional_embedding`` [77, D] |
| ``text_encoder.transformer.0.*`` / ``.{T+1}.*`` | ``text.mixer_in.*`` / ``text.mixer_out.*`` |
| ``text_encoder.transformer.i.pre_norm_mha.0.*`` | ``text.transformer.{i-1}.norm1.*`` |
| ``text_encoder.transformer.i.pre_norm_mha.1.qkv_proj.*`` / ``.out_proj.*`` | ``text.transformer.{i-1}.attn.qkv.*`` / ``.attn.proj.*`` |
| ``text_encoder.transformer.i.pre_norm_ffn.0.*`` / ``.1.*`` / ``.4.*`` | ``text.transformer.{i-1}.norm2.*`` / ``.mlp.fc1.*`` / ``.mlp.fc2.*`` |
| ``text_encoder.final_layer_norm.*`` / ``text_encoder.projection_layer`` | ``text.final_norm.*`` / ``text.projection`` |
| ``logit_scale`` | ``logit_scale`` |

A reparameterised state dict (``reparam_conv`` / ``lkb_reparam`` keys) loads into a reparameterised
model. Loading is strict: every missing, unexpected or mis-shaped key is listed in one error, named as
in Apple's file (:func:`siclip_key_to_apple` is the inverse mapping; :func:`to_apple_state_dict`
writes a model in Apple's layout). :func:`load_model` reads either format, detecting which.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor

from siclip.errors import UserError
from siclip.storage import load_weights

from .clip import CLIP
from .factory import create_model
from .reparam import reparameterize_model

_TEXT_BLOCK_PARTS = {
    "pre_norm_mha.0": "norm1",
    "pre_norm_mha.1.qkv_proj": "attn.qkv",
    "pre_norm_mha.1.out_proj": "attn.proj",
    "pre_norm_ffn.0": "norm2",
    "pre_norm_ffn.1": "mlp.fc1",
    "pre_norm_ffn.4": "mlp.fc2",
}
_SIMPLE = [
    (r"^image_encoder\.model\.conv_exp\.se\.reduce\.", "visual.conv_exp.se.fc1."),
    (r"^image_encoder\.model\.conv_exp\.se\.expand\.", "visual.conv_exp.se.fc2."),
    (r"^image_encoder\.model\.", "visual."),
    (r"^text_encoder\.embedding_layer\.", "text.token_embedding."),
    (r"^text_encoder\.positional_embedding\.pos_embed\.pos_embed$", "text.positional_embedding"),
    (r"^text_encoder\.final_layer_norm\.", "text.final_norm."),
    (r"^text_encoder\.projection_layer$", "text.projection"),
    (r"^logit_scale$", "logit_scale"),
]


def apple_key_to_siclip(key: str, text_layers: int = 4) -> str | None:
    """The siclip name of an Apple MobileCLIP key, or None when the key has no counterpart."""
    match = re.match(r"^text_encoder\.transformer\.(\d+)\.(.*)$", key)
    if match:
        index, rest = int(match.group(1)), match.group(2)
        if index == 0:
            return f"text.mixer_in.{rest}"
        if index == text_layers + 1:
            return f"text.mixer_out.{rest}"
        for apple, ours in _TEXT_BLOCK_PARTS.items():
            if rest.startswith(apple + "."):
                return f"text.transformer.{index - 1}.{ours}.{rest[len(apple) + 1:]}"
        return None
    for pattern, replacement in _SIMPLE:
        if re.match(pattern, key):
            return re.sub(pattern, replacement, key)
    return None


_SIMPLE_INVERSE = [
    (r"^visual\.conv_exp\.se\.fc1\.", "image_encoder.model.conv_exp.se.reduce."),
    (r"^visual\.conv_exp\.se\.fc2\.", "image_encoder.model.conv_exp.se.expand."),
    (r"^visual\.", "image_encoder.model."),
    (r"^text\.token_embedding\.", "text_encoder.embedding_layer."),
    (r"^text\.positional_embedding$", "text_encoder.positional_embedding.pos_embed.pos_embed"),
    (r"^text\.final_norm\.", "text_encoder.final_layer_norm."),
    (r"^text\.projection$", "text_encoder.projection_layer"),
    (r"^logit_scale$", "logit_scale"),
]


def siclip_key_to_apple(name: str, text_layers: int = 4) -> str:
    """The Apple MobileCLIP name of a siclip key (the inverse of :func:`apple_key_to_siclip`); unknown names pass through."""
    match = re.match(r"^text\.(mixer_in|mixer_out)\.(.*)$", name)
    if match:
        index = 0 if match.group(1) == "mixer_in" else text_layers + 1
        return f"text_encoder.transformer.{index}.{match.group(2)}"
    match = re.match(r"^text\.transformer\.(\d+)\.(.*)$", name)
    if match:
        index, rest = int(match.group(1)), match.group(2)
        for apple, ours in _TEXT_BLOCK_PARTS.items():
            if rest.startswith(ours + "."):
                return f"text_encoder.transformer.{index + 1}.{apple}.{rest[len(ours) + 1:]}"
        return name
    for pattern, replacement in _SIMPLE_INVERSE:
        if re.match(pattern, name):
            return re.sub(pattern, replacement, name)
    return name


def to_apple_state_dict(model: CLIP) -> dict[str, Tensor]:
    """``model``'s weights in the layout of Apple's ``mobileclip_s0.pt`` (positional table as [1, 1, T, D])."""
    layers = model.config.text.layers
    out = {}
    for name, value in model.state_dict().items():
        if name == "text.positional_embedding":
            value = value[None, None]
        out[siclip_key_to_apple(name, layers)] = value
    return out


def convert_apple_state_dict(state_dict: dict[str, Tensor], text_layers: int = 4) -> tuple[dict[str, Tensor], list[str]]:
    """``(mapped state dict, keys without a counterpart)``; the positional embedding is squeezed to (T, D)."""
    mapped, unmapped = {}, []
    for key, value in state_dict.items():
        name = apple_key_to_siclip(key, text_layers)
        if name is None:
            unmapped.append(key)
            continue
        if name == "text.positional_embedding" and value.dim() == 4:
            value = value.reshape(value.shape[-2], value.shape[-1])
        mapped[name] = value
    return mapped, unmapped


class CheckpointMismatch(UserError, ValueError):
    """A checkpoint that does not fit the model: carries every problem at once."""


APPLE_FILE_HINT = "pass Apple's released mobileclip_s0.pt, or a siclip checkpoint"


def _holds(payload) -> str:
    """What a loaded file holds, in a few words (its first keys, or its type)."""
    if isinstance(payload, dict):
        keys = [str(k) for k in list(payload)[:5]]
        return f"keys {keys}" + (f" and {len(payload) - 5} more" if len(payload) > 5 else "")
    return f"a {type(payload).__name__}"


def check_state_dict(
    model: torch.nn.Module, state_dict: dict[str, Tensor], unmapped: list[str] = (), what: str = "checkpoint", display=lambda k: k
) -> None:
    """Raise :class:`CheckpointMismatch` listing missing, unexpected and mis-shaped keys, if any.

    ``display`` names a key as the user's file does (e.g. :func:`siclip_key_to_apple`). BatchNorm's
    ``num_batches_tracked`` counters may be absent (they do not affect the outputs).
    """
    expected = model.state_dict()
    missing = [display(k) for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = list(unmapped) + [display(k) for k in state_dict if k not in expected]
    shapes = [
        f"{display(k)}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or shapes:
        def listing(label: str, items: list[str]) -> str:
            shown = ", ".join(items[:12]) + (f", … ({len(items) - 12} more)" if len(items) > 12 else "")
            return f"\n  {len(items)} {label}: {shown}" if items else ""

        raise CheckpointMismatch(
            f"{what} does not match the model:"
            + listing("missing keys", missing)
            + listing("unexpected keys", unexpected)
            + listing("shape mismatches", shapes)
        )


def load_mobileclip_s0(path_or_state_dict: str | Path | dict, *, model: str = "mobileclip_s0", what: str = "state dict") -> CLIP:
    """MobileCLIP-S0 (``model`` may name another registered MobileCLIP config) carrying Apple's weights.

    Accepts the path of ``mobileclip_s0.pt`` or its state dict (possibly wrapped in ``"state_dict"``).
    Returns the model in eval mode, in the form of the checkpoint (train-time or reparameterised).
    """
    if isinstance(path_or_state_dict, (str, Path)):
        state_dict = load_weights(path_or_state_dict, what="MobileCLIP checkpoint", hint=APPLE_FILE_HINT)
        what = str(path_or_state_dict)
    else:
        state_dict = path_or_state_dict
    if isinstance(state_dict, dict) and isinstance(state_dict.get("state_dict"), dict):
        state_dict = state_dict["state_dict"]
    if not is_apple_layout(state_dict):
        raise CheckpointMismatch(f"{what} is not in the layout of Apple's mobileclip_s0.pt (no image_encoder.* / text_encoder.* "
                                 f"keys; it holds {_holds(state_dict)}); {APPLE_FILE_HINT}")  # fmt: skip
    net = create_model(model).eval()
    if any(".reparam_conv." in k or ".lkb_reparam." in k for k in state_dict):
        reparameterize_model(net, inplace=True)
    layers = net.config.text.layers
    mapped, unmapped = convert_apple_state_dict(state_dict, layers)
    check_state_dict(net, mapped, unmapped, what, display=lambda k: siclip_key_to_apple(k, layers))
    net.load_state_dict(mapped, strict=False)
    return net


def is_apple_layout(payload) -> bool:
    """A (possibly ``"state_dict"``-wrapped) state dict with Apple's ``image_encoder.`` / ``text_encoder.`` keys."""
    if isinstance(payload, dict) and isinstance(payload.get("state_dict"), dict):
        payload = payload["state_dict"]
    return isinstance(payload, dict) and any(isinstance(k, str) and k.startswith(("image_encoder.", "text_encoder.")) for k in payload)


def load_model(path: str | Path, *, model: str = "mobileclip_s0") -> tuple[CLIP, dict | None]:
    """``(model, tokenizer spec saved with it or None)`` from a siclip checkpoint or a file in Apple's
    ``mobileclip_s0.pt`` layout (built as the registered config ``model``); the format is detected."""
    from .factory import checkpoint_model, list_models

    path = Path(path)
    if not path.is_file():
        hint = ""
        if str(path) in list_models():  # an architecture's name, not trained weights
            hint = (f" ({path} names a registered architecture, whose fresh weights have nothing to evaluate: pass a "
                    "trained checkpoint, e.g. runs/<run>/model.pt, or Apple's mobileclip_s0.pt)")  # fmt: skip
        raise FileNotFoundError(f"model file not found: {path}{hint}")
    payload = load_weights(path, what="model file", hint=APPLE_FILE_HINT)
    if isinstance(payload, dict) and payload.get("format") == "siclip-model-1":
        return checkpoint_model(payload, path), payload.get("tokenizer")
    if is_apple_layout(payload):
        return load_mobileclip_s0(payload, model=model, what=str(path)), None
    raise CheckpointMismatch(f"{path}: neither a siclip checkpoint nor a state dict in Apple's MobileCLIP layout (it holds "
                             f"{_holds(payload)}); {APPLE_FILE_HINT}")  # fmt: skip
