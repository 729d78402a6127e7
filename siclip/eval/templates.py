"""CLIP's ImageNet prompt ensemble (Radford et al. 2021, the 80 templates of its prompt-engineering notebook): the
default templates of zero-shot classification on the user's classes. The data live in ``data/templates.json`` with
CLIP's other prompt sets (:mod:`siclip.eval.named`)."""

from .named import builtin_templates

CLIP_TEMPLATES = tuple(builtin_templates("imagenet1k"))
