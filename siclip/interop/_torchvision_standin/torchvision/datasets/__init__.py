"""``torchvision.datasets``: refusing placeholders (timm's dataset factory names them at import time)."""

from torchvision import placeholder


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    return placeholder(__name__, name)
