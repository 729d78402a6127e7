"""Zero-shot classification and image–text retrieval, following the CLIP_benchmark protocol: on the
embedded sets (:func:`evaluate_embedded`) or on the user's own (:mod:`siclip.eval.benchmarks`)."""

from .benchmarks import (
    CLIP_TEMPLATES, benchmark_record, check_captions, check_prompts, headline, read_classnames, read_templates, retrieval, retrieval_dataset, run_benchmarks, write_record,
    zero_shot_classification, zero_shot_dataset,
)  # fmt: skip
from .metrics import per_class_accuracy, recall_at_k, topk_accuracy, zero_shot_weights
from .run import embed_source, evaluate_embedded, retrieval_eval, zero_shot_eval, zero_shot_logits

__all__ = [
    "CLIP_TEMPLATES", "benchmark_record", "check_captions", "check_prompts", "embed_source", "evaluate_embedded", "headline", "per_class_accuracy", "read_classnames",
    "read_templates", "recall_at_k", "retrieval", "retrieval_dataset", "retrieval_eval", "run_benchmarks", "topk_accuracy",
    "write_record", "zero_shot_classification", "zero_shot_dataset", "zero_shot_eval", "zero_shot_logits", "zero_shot_weights",
]  # fmt: skip
