"""Zero-shot classification and image–text retrieval, following the CLIP_benchmark protocol."""

from .metrics import recall_at_k, topk_accuracy, zero_shot_weights
from .run import embed_source, evaluate_embedded, retrieval_eval, zero_shot_eval

__all__ = ["embed_source", "evaluate_embedded", "recall_at_k", "retrieval_eval", "topk_accuracy", "zero_shot_eval", "zero_shot_weights"]
