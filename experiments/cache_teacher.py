"""``siclip cache-teacher``, as a script of this checkout: ``python experiments/cache_teacher.py --help`` describes it."""

import sys

from siclip import cli  # first: a Ctrl-C while the rest imports ends in one line

from siclip.commands.cache_teacher import main

if __name__ == "__main__":
    sys.exit(cli.run(main))
