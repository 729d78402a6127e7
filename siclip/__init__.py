"""siclip: train compact CLIP models on one consumer GPU.

After *Simplifying CLIP* (Liu, arXiv 2411.14789) and *Simplifying Transformer Blocks*
(He & Hofmann, ICLR 2024). Each subpackage imports on its own:

- :mod:`siclip.blocks`: shaped attention, Pre-LN / SAS / SAS-P blocks, weight sharing, conversion.
"""

__version__ = "0.1.0"
