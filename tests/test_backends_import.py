"""siclip.blocks starts fast: importing it does not import torch._dynamo, and the compile marker it sets by hand is
the one torch's decorator sets."""

import subprocess
import sys


def test_importing_the_blocks_leaves_torch_dynamo_unimported():
    code = "import sys, siclip.blocks, siclip.models; print('torch._dynamo' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr


def test_the_hand_set_marker_is_what_torch_compiler_sets():
    import torch

    from siclip.blocks.backends import _assume_constant_result

    def ours():
        return 1

    def theirs():
        return 1

    _assume_constant_result(ours)
    torch.compiler.assume_constant_result(theirs)
    assert vars(ours) == vars(theirs) == {"_dynamo_marked_constant": True}
