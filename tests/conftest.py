import os
import random
import sys
from pathlib import Path

import pytest
import torch


def _torchvision_standin() -> None:
    """timm and open_clip import torchvision; where its import fails (here a CUDA wheel beside a CPU torch, or no wheel
    at all) they get a stand-in for its import-time names, seen by their import alone (transformers would take any
    torchvision it can find for a whole one), in this process and in the scripts the tests start (PYTHONPATH runs
    ``tests/standins/startup/sitecustomize.py``). The model classes under test stay the libraries' own."""
    startup = str(Path(__file__).parent / "standins" / "startup")
    sys.path.insert(0, startup)
    import torchvision_standin

    torchvision_standin.install()
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (startup, os.environ.get("PYTHONPATH")) if p)


_torchvision_standin()

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# Without CUDA the Triton kernels run under Triton's interpreter, which must be on before they are decorated
# (siclip.blocks.shaped_kernels is imported lazily, after this file).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def seed(request) -> int:
    """A fresh seed per test (fixed with SICLIP_TEST_SEED=N); printed so a failure can be replayed."""
    value = int(os.environ.get("SICLIP_TEST_SEED", random.randrange(2**31)))
    torch.manual_seed(value)
    print(f"SICLIP_TEST_SEED={value}")
    return value


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    if not torch.cuda.is_available():
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip_gpu)
