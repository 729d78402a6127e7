"""Names of ``torchvision.transforms`` that timm and open_clip import; each refuses to run (see the package docstring)."""

from torchvision import placeholder

from . import functional
from .functional import InterpolationMode


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    return placeholder(__name__, name)
