"""What a run reads before its first step: the training source, the teacher, and a tokenizer that fits both
the data and the model.

Which tokenizer (first that applies): ``config.data.tokenizer``; the teacher's (the tokenizer saved in
its checkpoint, or the one its configuration names; a transformers or open_clip teacher's own, ``hf:DIR`` or
``open_clip:ARCH:FILE``), since the teacher reads the student's token ids; the one the student's configuration
names. ``"words"`` builds a word vocabulary from the training
captions (:func:`~siclip.data.tokenizer.build_word_vocabulary`) and saves it in ``out_dir/tokenizer.json``
(and with the model), so a resumed run and the evaluation use the same one.

Before the first step :func:`check_tokenizer` refuses (one ``ValueError``) a tokenizer whose ids do not
fit the student's or teacher's vocabulary, a student that does not use its teacher's tokenizer, and
captions whose unknown-token rate over the first batches exceeds ``config.data.max_unknown_rate``.
A student built from scratch takes the tokenizer's vocabulary (:func:`vocabulary_follows`).
"""

from __future__ import annotations

import dataclasses

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from siclip.data import EmbeddedConfig, EpochSampler, SampleError, open_source
from siclip.data.quality import read_indices
from siclip.data.sources import SubsetSource
from siclip.data.tokenizer import build_word_vocabulary, check_unknown_rate, create_tokenizer, tokenizer_for, tokenizer_from_spec, tokenizer_spec
from siclip.interop import load_clip
from siclip.models import ModelConfig
from siclip.storage import write_text_atomic

from .config import TrainConfig
from .evaluation import check_evaluation_inputs
from .guard import nonfinite_names


@dataclass
class RunInputs:
    source: object
    tokenizer: object
    teacher: object | None  # a CLIP with siclip's interface (siclip.interop), or None
    unknown_rate: float
    teacher_tokenizer: object | None = None  # the teacher's own, when it does not read the student's ids
    student: object | None = None  # a student that exists before the run (a converted CLIP file), else built by build_task
    distiller: object | None = None  # a separate distillation teacher (config.distill_teacher); None: ``teacher`` distils


def open_training_source(config: TrainConfig, image_size: int):
    data = config.data
    csv = {"image_key": data.image_key, "caption_key": data.caption_key, "synthetic_keys": list(data.synthetic_keys)}
    if data.shape_twins and data.source != "embedded":
        raise ValueError(f"shape_twins is a property of the embedded world; the training data is {data.source!r}")
    if data.caption_noise and data.source != "embedded":
        raise ValueError(f"caption_noise misaligns pairs of the embedded world; the training data is {data.source!r}")
    embedded = EmbeddedConfig(seed=data.seed, num_train=data.num_train, image_size=image_size, shape_twins=data.shape_twins,
                              num_synthetic=data.num_synthetic, caption_noise=data.caption_noise)
    source = open_source(data.source, embedded, **csv)
    if data.subset is not None:  # a kept subset (siclip filter), or any list of samples
        if data.shape_twins:
            raise ValueError("shape_twins batches scenes with their twins, which a subset of the world would separate: choose one")
        source = SubsetSource(source, read_indices(data.subset, len(source)))
    return source


def training_captions(source, indices, p_synthetic: float = 0.5) -> list[str]:
    """Every caption of the samples at ``indices`` that training can draw (raw unless ``p_synthetic`` is 1,
    synthetic unless it is 0); samples that cannot be loaded are left out."""
    texts = []
    for i in indices:
        try:
            sample = source.load(int(i))
        except SampleError:
            continue
        if p_synthetic < 1 and sample.raw_caption:
            texts.append(sample.raw_caption)
        if p_synthetic > 0:
            texts.extend(sample.synthetic)
    return texts


def first_batches(config: TrainConfig, size: int) -> list[int]:
    """The sample indices of the first batches of epoch 0 (the loader's own order on rank 0)."""
    order = EpochSampler(size, seed=config.seed).order(0)
    return order[: config.data.tokenizer_check_samples].tolist()


def resolve_tokenizer(config: TrainConfig, model_config: ModelConfig, source, teacher, teacher_spec: dict | None, *, resume: bool = False,
                      foreign_teacher=None):  # fmt: skip
    """The run's tokenizer (see the module docstring for the order of choice); ``foreign_teacher`` a loaded teacher that
    is not a siclip CLIP (:class:`~siclip.models.loaded.LoadedClip`), whose own tokenizer is then the default."""
    data, context = config.data, model_config.text.context_length
    saved = Path(config.out_dir) / "tokenizer.json"
    if resume and saved.is_file():
        return tokenizer_from_spec(json.loads(saved.read_text()), str(saved))
    if data.tokenizer is None and teacher is not None:
        return tokenizer_for(teacher.config.text, teacher_spec, str(config.teacher))
    if data.tokenizer is None and foreign_teacher is not None:
        return foreign_teacher.tokenizer
    name = data.tokenizer or model_config.text.tokenizer
    if name == "words" and data.vocab_path is None:
        limit = len(source) if data.vocab_samples is None else min(len(source), data.vocab_samples)
        words = build_word_vocabulary(training_captions(source, range(limit), data.p_synthetic), min_count=data.vocab_min_count)
        return create_tokenizer("words", words=words, context_length=context)
    return create_tokenizer(name, vocab_path=data.vocab_path, context_length=context)


def vocabulary_follows(model_config: ModelConfig, tokenizer) -> ModelConfig:
    """A model built from scratch embeds the tokenizer's ids: its vocabulary becomes the tokenizer's when the
    tokenizer is not the one its configuration names (or does not fit it), and its context the tokenizer's when the
    tokenizer pads to a longer one (a teacher's tokenizer pads to its own context length)."""
    text = model_config.text
    context = max(getattr(tokenizer, "context_length", None) or 0, text.context_length)
    if tokenizer.name == text.tokenizer and tokenizer.vocab_size <= text.vocab_size and context == text.context_length:
        return model_config
    from dataclasses import replace

    return replace(model_config, text=replace(text, vocab_size=tokenizer.vocab_size, tokenizer=tokenizer.name, context_length=context))


def settled_model_config(model_config: ModelConfig, tokenizer, teacher) -> ModelConfig:
    """The student's configuration: a SiCLIP inheriting from a teacher keeps it (and the teacher's
    vocabulary), reading text and images as the teacher does (``mask_padding``, ``image_size``); a model
    built from scratch takes the tokenizer's vocabulary."""
    if teacher is not None and model_config.siclip is not None:
        return dataclasses.replace(model_config, text=dataclasses.replace(model_config.text, mask_padding=teacher.config.text.mask_padding),
                                   image=dataclasses.replace(model_config.image, image_size=teacher.config.image.image_size))
    return vocabulary_follows(model_config, tokenizer)


def check_tokenizer(tokenizer, student_config: ModelConfig, teacher, teacher_spec: dict | None, where: str, *, inherits: bool) -> None:
    """One error, before the first step, when token ids cannot mean what the models expect: the student's ids beyond
    its vocabulary; a student inheriting a teacher's token embeddings (``inherits``) with another tokenizer than the
    teacher's; a siclip ``teacher`` whose own tokenizer's ids exceed its vocabulary. (A teacher reads its own
    tokenizer's ids: the student's when they are the same tokenizer, else ``RunInputs.teacher_tokenizer``'s.)"""
    problems = []
    if tokenizer.vocab_size > student_config.text.vocab_size:
        problems.append(f"its {tokenizer.vocab_size} ids do not fit the student's vocabulary of {student_config.text.vocab_size}")
    if teacher is not None:
        own = tokenizer_for(teacher.config.text, teacher_spec, where)
        if own.vocab_size > teacher.config.text.vocab_size:
            problems.append(f"the teacher's tokenizer {own.name!r} has {own.vocab_size} ids, which do not fit the teacher's vocabulary "
                            f"of {teacher.config.text.vocab_size} ({where} was saved with another tokenizer than it was trained with)")  # fmt: skip
        if inherits and tokenizer_spec(own) != tokenizer_spec(tokenizer):
            problems.append(f"the student inherits the teacher's token embeddings, which were trained with the {own.name!r} "
                            f"tokenizer ({own.vocab_size} ids); leave --tokenizer out to use it")  # fmt: skip
    if problems:
        raise ValueError(f"tokenizer {tokenizer.name!r} ({tokenizer.vocab_size} ids) does not fit model {student_config.name!r}: " + "; ".join(problems))


def load_intact(spec: str, flag: str, apple_model: str):
    """The model ``spec`` names (:func:`siclip.interop.load_clip`), refused when a weight holds NaN or Inf."""
    loaded = load_clip(spec, apple_model=apple_model)
    model = loaded.model  # siclip's CLIP or an adapter module holding the foreign model
    bad = []
    if isinstance(model, torch.nn.Module):  # buffers may hold -inf by design (attention masks), never NaN
        bad = nonfinite_names(model.named_parameters())
        bad += [name for name, b in model.named_buffers() if b.is_floating_point() and bool(torch.isnan(b).any())]
    if bad:  # else the first step reports the student's copies of them, and the file is never named
        raise ValueError(f"{flag} {spec} holds NaN or Inf in {', '.join(bad[:5])}"
                         f"{f' and {len(bad) - 5} more' if len(bad) > 5 else ''}: a student cannot inherit from it or "
                         "distil from it; pass an intact teacher file")  # fmt: skip
    return loaded


def load_teacher(config: TrainConfig, model_config: ModelConfig | None):
    """The teacher a run names (any model spec, :func:`siclip.interop.load_clip`), or None; a SiCLIP student asked to
    inherit weights from a teacher that is not a siclip MobileCLIP is refused (there are no weights to map)."""
    if config.teacher is None:
        return None
    loaded = load_intact(config.teacher, "--teacher", config.teacher_model)
    if not loaded.is_siclip and model_config is not None and model_config.siclip is not None and config.inherit:
        raise ValueError(f"--teacher {config.teacher}: a SiCLIP student inherits weights (WI) only from a siclip MobileCLIP teacher "
                         f"(a siclip checkpoint or Apple's mobileclip_s0.pt), not from a {type(loaded.model).__name__}; pass "
                         "--no-inherit to train the student from scratch and distil from this teacher (--wikd)")  # fmt: skip
    return loaded


def prepare_run(config: TrainConfig, model_config: ModelConfig | None, *, resume: bool = False) -> RunInputs:
    """Source, teacher and a tokenizer checked against the models and the first batches' captions, and the
    evaluation inputs; nothing is written (:func:`save_tokenizer` keeps the tokenizer once the run starts).

    A student that inherits from a teacher takes the teacher's input size unless one was asked for. ``model_config``
    None: the student is a converted CLIP file (``config.model``, :func:`prepare_converted_run`)."""
    if model_config is None:
        return prepare_converted_run(config)
    loaded = load_teacher(config, model_config)
    teacher = loaded.model if loaded is not None and loaded.is_siclip else None  # one whose config a student can follow
    teacher_spec = loaded.tokenizer_spec if loaded is not None else None
    inherits = teacher is not None and model_config.siclip is not None and config.inherit
    if inherits:
        if model_config.image.family != teacher.config.image.family:
            raise ValueError(f"the SiCLIP student inherits (WI) {config.teacher}, whose image tower is a {teacher.config.image.family} "
                             f"tower, and becomes a copy of it, not the {model_config.image.family} tower asked for: leave the image "
                             "tower out, or pass --no-inherit to train that student from scratch and distil from the teacher")  # fmt: skip
        asked, size = config.model_overrides.get("image", {}).get("image_size"), teacher.config.image.image_size
        if asked is not None and asked != size:
            raise ValueError(f"the student inherits {config.teacher}, which takes {size} px images, "
                             f"not {asked}: leave --image-size out or pass {size}")  # fmt: skip
        model_config = settled_model_config(model_config, None, teacher)
    source = open_training_source(config, model_config.image.image_size)
    foreign = loaded if loaded is not None and not loaded.is_siclip else None
    tokenizer = resolve_tokenizer(config, model_config, source, teacher, teacher_spec, resume=resume, foreign_teacher=foreign)
    student_config = teacher.config if inherits else settled_model_config(model_config, tokenizer, teacher)
    check_tokenizer(tokenizer, student_config, teacher, teacher_spec, str(config.teacher), inherits=inherits)
    rate = check_unknown_rate(tokenizer, training_captions(source, first_batches(config, len(source)), config.data.p_synthetic),
                              config.data.max_unknown_rate, config.data.source)  # fmt: skip
    check_evaluation_inputs(config, tokenizer)
    distiller = load_intact(config.distill_teacher, "--distill-teacher", config.teacher_model) if config.distill_teacher else None
    distils = distiller if distiller is not None else loaded
    teacher_tokenizer = None
    if distils is not None and tokenizer_spec_or_none(distils.tokenizer) != tokenizer_spec_or_none(tokenizer):
        teacher_tokenizer = distils.tokenizer  # the teacher reads its own ids of the same captions
    return RunInputs(source, tokenizer, loaded.model if loaded is not None else None, rate, teacher_tokenizer,
                     distiller=distiller.model if distiller is not None else None)


def save_tokenizer(config: TrainConfig, tokenizer) -> Path:
    """``out_dir/tokenizer.json``: what a resumed run and the evaluation rebuild the run's tokenizer from."""
    return write_text_atomic(json.dumps(tokenizer_spec(tokenizer)), Path(config.out_dir) / "tokenizer.json")


def tokenizer_spec_or_none(tokenizer) -> dict | None:
    """siclip's spec of a tokenizer, or None for a foreign one (which never equals a siclip tokenizer)."""
    return tokenizer_spec(tokenizer) if tokenizer.name in ("embedded", "clip", "words") else None


def prepare_converted_run(config: TrainConfig) -> RunInputs:
    """A transformers or open_clip CLIP converted to SAS-P (``experiments/convert_model.py``) as the student: it reads
    its original's tokenizer and preprocessing, and a teacher (typically that original) distils into it."""
    from siclip.interop.converted import load_converted_clip, resolve_origin

    student = load_converted_clip(config.model)
    if config.data.tokenizer is not None:
        raise ValueError(f"--tokenizer: {config.model} reads its original's tokenizer ({student.tokenizer.name}); leave --tokenizer out")
    if config.model_overrides.get("image", {}).get("image_size") not in (None, student.model.preprocess.size):
        raise ValueError(f"{config.model} takes {student.model.preprocess.size} px images: leave --image-size out")
    if config.distill_teacher is not None:
        raise ValueError(f"--distill-teacher: {config.model} inherits nothing from a teacher; give the model to distil from as --teacher")
    loaded = load_teacher(config, None)
    source = open_training_source(config, student.model.preprocess.size)
    rate = check_unknown_rate(student.tokenizer, training_captions(source, first_batches(config, len(source)), config.data.p_synthetic),
                              config.data.max_unknown_rate, config.data.source)  # fmt: skip
    check_evaluation_inputs(config, student.tokenizer)
    # The teacher reads the student's ids when it is the original the student was converted from (the same tokenizer).
    original = loaded is not None and resolve_origin(loaded.spec) == resolve_origin(student.model.recipe.origin)
    teacher_tokenizer = loaded.tokenizer if loaded is not None and not original else None
    return RunInputs(source, student.tokenizer, loaded.model if loaded is not None else None, rate, teacher_tokenizer, student.model)