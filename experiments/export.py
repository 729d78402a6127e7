"""``siclip export``, as a script of this checkout: ``python experiments/export.py --help`` describes it."""

import sys

from siclip import cli  # first: a Ctrl-C while the rest imports ends in one line

from siclip.commands.export import main

if __name__ == "__main__":
    sys.exit(cli.run(main))
