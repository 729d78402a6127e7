"""Test subprocesses: timm and open_clip import with a torchvision stand-in only they see (see torchvision_standin.py)."""

import torchvision_standin

torchvision_standin.install()
