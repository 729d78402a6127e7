"""siclip and the models people already hold: one module per foreign library, each imported only when needed.

- :mod:`siclip.interop.transformers` — Hugging Face transformers (CLIP, SigLIP, ViT, GPT-2)
- :mod:`siclip.interop.timm` — timm (Vision Transformer blocks)
- :mod:`siclip.interop.open_clip` — open_clip (text and visual towers, whole CLIPs)

Each module imports its library at the top and registers what siclip knows about it into siclip's registries
(:class:`siclip.blocks.registry.TypeRegistry`): block converters, attention readers, CLIP adapters and their
preprocessing. A registry imports the module the first time it meets an object of that library
(:func:`siclip.blocks.registry.import_interop_for`), so siclip never requires, and never itself imports, a foreign
library. This file stays free of foreign imports.
"""
