"""``python -m siclip …`` runs the ``siclip`` command."""

import sys

from siclip import cli  # first: a Ctrl-C while the rest imports ends in one line

from siclip.commands import main

if __name__ == "__main__":
    sys.exit(main())
