"""The end-of-run evaluation: the user's benchmarks when given, the embedded world's only when asked for
(or when training on the embedded world with no benchmark of the user's named).

Results go to ``out_dir/eval/{dataset}_{task}.json`` in CLIP_benchmark's layout; the run summary gets
the scalar metrics (``dataset/metric`` for the user's sets, ``zeroshot_top1``… for the embedded world).
"""

from __future__ import annotations

from pathlib import Path

from siclip.data import EmbeddedConfig

from .config import TrainConfig


def wants_embedded_eval(config: TrainConfig) -> bool:
    if config.eval_embedded is not None:
        return config.eval_embedded
    return config.data.source == "embedded" and config.eval_zeroshot is None and config.eval_retrieval is None


def evaluate_run(student, tokenizer, config: TrainConfig) -> dict[str, float]:
    from siclip.eval import benchmark_record, evaluate_embedded, headline, run_benchmarks, write_record

    out = Path(config.out_dir) / "eval"
    records = run_benchmarks(student, tokenizer, model_name=config.model, zeroshot=config.eval_zeroshot, classnames=config.eval_classnames,
                             templates=config.eval_templates, retrieval_data=config.eval_retrieval, out_dir=out)  # fmt: skip
    metrics = headline(records)
    if wants_embedded_eval(config):
        world = EmbeddedConfig(seed=config.data.seed, zero_shot_per_class=config.eval_zero_shot_per_class)
        embedded = evaluate_embedded(student, tokenizer, world, retrieval_images=config.eval_retrieval_images)
        write_record(benchmark_record("embedded", config.model, "embedded_world", embedded), out)
        metrics |= embedded
    return metrics


def read_caption_file(path: str | Path) -> list[str]:
    """Captions, one per line (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"captions file not found: {path}")
    texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise ValueError(f"{path}: no captions (expected one per line)")
    return texts
