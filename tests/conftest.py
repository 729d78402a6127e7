import os
import random

import pytest
import torch

# Under pytest-xdist (`make test` runs one worker per core) each worker takes one core's thread, so the workers do not
# oversubscribe the machine; alone, a test takes up to two.
# The commands a test starts in its own process inherit the same share through OMP_NUM_THREADS: two workers' children
# each spinning two OpenMP threads on two cores ran a study's smoke run ten times slower.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_threads = max(1, min(2, (os.cpu_count() or 1) // _workers))
torch.set_num_threads(_threads)
if _workers > 1:
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(_threads)
# Without CUDA the Triton kernels run under Triton's interpreter, which must be on before they are decorated
# (siclip.blocks.shaped_kernels is imported lazily, after this file).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# timm and open_clip import through the stand-in siclip lends them where torchvision cannot load (one implementation,
# siclip/interop/_torchvision_standin; importing siclip.interop installs it, as the commands the tests start do).
from siclip.interop._torchvision_standin import install as _lend_torchvision_standin  # noqa: E402

_lend_torchvision_standin()


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
