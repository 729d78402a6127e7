"""A minimal stand-in for torchvision's import-time names, lent to timm's and open_clip's import alone.

timm and open_clip import torchvision for data transforms and for ``FrozenBatchNorm2d``; their model classes, which
siclip uses, do not need it. Where torchvision cannot be imported (its registry wheel is a CUDA build that fails
beside a CPU torch with ``operator torchvision::nms does not exist``, or it is not installed),
:mod:`siclip.interop._torchvision_standin` puts this package on the path for their import only. Anything a model
would really need from torchvision raises, naming this stand-in: nothing can pass through a fake transform.
"""

__version__ = "0.0.0+siclip-standin"
STANDIN = True


def placeholder(module: str, name: str):
    """A class that can be named at import time and refuses to be used."""

    def refuse(*args, **kwargs):
        raise NotImplementedError(f"{module}.{name} is not available: torchvision cannot be imported here, and siclip lent timm and "
                                  "open_clip a stand-in for its import-time names only (siclip/interop/_torchvision_standin); "
                                  "install a torchvision built for this torch to use its transforms")  # fmt: skip

    return type(name, (), {"__init__": refuse, "__call__": refuse, "__module__": module})
