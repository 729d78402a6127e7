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


def nothing_evaluated(config: TrainConfig) -> str:
    """What a run whose evaluation measured nothing says of it (in summary.json's ``eval_note`` and on stdout):
    training on the user's data with no benchmark named evaluates nothing, and that is said, not left as ``{}``."""
    return (f"nothing was evaluated: the run trained on {config.data.source} and named no benchmark; give --zeroshot and/or "
            "--retrieval (or --eval-embedded for the embedded world's) to evaluate the model")  # fmt: skip


def evaluate_run(student, tokenizer, config: TrainConfig) -> dict[str, float]:
    from siclip.eval import benchmark_record, evaluate_embedded, headline, run_benchmarks, write_record

    out = Path(config.out_dir) / "eval"
    records = run_benchmarks(student, tokenizer, model_name=config.model, zeroshot=config.eval_zeroshot, classnames=config.eval_classnames,
                             templates=config.eval_templates, retrieval_data=config.eval_retrieval, out_dir=out,
                             max_unknown_rate=config.data.max_unknown_rate)  # fmt: skip
    metrics = headline(records)
    if wants_embedded_eval(config):
        world = EmbeddedConfig(seed=config.data.seed, zero_shot_per_class=config.eval_zero_shot_per_class)
        embedded = evaluate_embedded(student, tokenizer, world, retrieval_images=config.eval_retrieval_images)
        write_record(benchmark_record("embedded", config.model, "embedded_world", embedded), out)
        metrics |= embedded
    return metrics


def check_evaluation_inputs(config: TrainConfig, tokenizer) -> None:
    """Read the user's benchmarks before the first step, so a missing file, a malformed set or prompts the tokenizer
    cannot represent (``config.data.max_unknown_rate``) stop the run at once, not after training."""
    if not config.evaluate:
        return
    from siclip.eval import check_captions, check_prompts, read_classnames, read_templates, retrieval_dataset, zero_shot_dataset

    if config.eval_zeroshot is not None:
        names = read_classnames(config.eval_classnames) if config.eval_classnames is not None else None
        templates = read_templates(config.eval_templates)
        _, _, names = zero_shot_dataset(config.eval_zeroshot, names)
        check_prompts(tokenizer, names, templates, config.data.max_unknown_rate, f"{config.eval_zeroshot} (zero-shot prompts)",
                      folder_names=config.eval_classnames is None)  # fmt: skip
    if config.eval_retrieval is not None:
        _, captions = retrieval_dataset(config.eval_retrieval)
        check_captions(tokenizer, captions, config.data.max_unknown_rate, f"{config.eval_retrieval} (retrieval captions)")


