"""``siclip study scaling-down``, as a script of this checkout: ``python experiments/scaling_down.py --help`` describes it."""

import sys

from siclip import cli  # first: a Ctrl-C while the rest imports ends in one line

from siclip.commands.scaling_down import main

if __name__ == "__main__":
    sys.exit(cli.run(main))
