"""Deployment: a CLIP's two encoders as ONNX files, run and evaluated under ONNX Runtime.

- :func:`export_clip` (:mod:`siclip.deploy.export`): any CLIP whose encoders are torch modules (a siclip checkpoint,
  Apple's file, a converted file, ``hf:DIR``, ``open_clip:ARCH:FILE``, through :func:`siclip.interop.load_clip`) → an
  *exported directory*: the reparameterised (fused) image and text encoders
  as ``image.onnx`` and ``text.onnx`` with a dynamic batch axis, and :data:`MANIFEST` beside them (preprocessing,
  tokenizer, logit scale, embedding size, name, the check). On export, ONNX Runtime is checked against PyTorch on
  real images and captions; ``quantize="int8"`` adds ``int8/``, the same encoders with ONNX Runtime's dynamic int8
  quantisation, as an exported directory of its own.
- :func:`load_exported` (:mod:`siclip.deploy.runtime`): an exported directory as a CLIP with siclip's interface
  (:mod:`siclip.interop`), which ``load_clip(DIR)`` dispatches to, so ``experiments/evaluate.py --model DIR/``
  evaluates the ONNX files.

Needs the ``deploy`` extra (``onnx``, ``onnxscript``, ``onnxruntime``, and ``scikit-learn`` for the check's images).
"""

from .export import (
    ATTENTION_KERNELS, DEFAULT_ATTENTION, DEFAULT_OPSET, MAX_RELATIVE_ERROR, MIN_INT8_COSINE, Encoder, ExportCheckError, ExportedFiles, export_clip,
    export_encoder, max_relative_error, sample_captions, sample_images,
)  # fmt: skip
from .runtime import FORMAT, MANIFEST, OnnxClip, create_session, is_exported_dir, load_exported, read_manifest

__all__ = [
    "ATTENTION_KERNELS", "DEFAULT_ATTENTION", "DEFAULT_OPSET", "FORMAT", "MANIFEST", "MAX_RELATIVE_ERROR", "MIN_INT8_COSINE", "Encoder", "ExportCheckError",
    "ExportedFiles", "OnnxClip", "create_session", "export_clip", "export_encoder", "is_exported_dir", "load_exported",
    "max_relative_error", "read_manifest", "sample_captions", "sample_images",
]  # fmt: skip
