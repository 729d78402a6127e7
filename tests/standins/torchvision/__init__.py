"""A minimal stand-in for torchvision, for the test environment only.

timm and open_clip import torchvision for data transforms and for ``FrozenBatchNorm2d``; their model classes
(what siclip's interoperability tests exercise) do not use it. The torchvision wheel on the test machine is a
CUDA build whose import fails beside a CPU torch (``operator torchvision::nms does not exist``), so
``tests/standins/startup/torchvision_standin.py`` lends it to their import alone, when ``import torchvision`` fails.
Anything a model would really need raises, naming this file: a test can never pass through a fake transform.
"""

__version__ = "0.0.0+siclip-test-standin"
STANDIN = True


def placeholder(module: str, name: str):
    """A class that can be named at import time and refuses to be used."""

    def refuse(*args, **kwargs):
        raise NotImplementedError(f"{module}.{name} is not available: tests/standins/torchvision is a stand-in for imports only")

    return type(name, (), {"__init__": refuse, "__call__": refuse, "__module__": module})
