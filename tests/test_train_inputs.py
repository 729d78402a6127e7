"""What a run checks before its first step: tokenizer and model agree, captions are representable,
Apple's checkpoint works as --teacher, CSV synthetic columns reach the dataset."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from siclip.models import create_model, get_model_config, save_checkpoint, to_apple_state_dict
from siclip.train import DataConfig, TrainConfig, build_task
from siclip.data.tokenizer import tokenizer_from_spec
from siclip.train.inputs import prepare_run, save_tokenizer


@pytest.fixture
def digits_csv(tmp_path):
    (tmp_path / "img").mkdir()
    rows = ["filepath,title,syn0"]
    for i in range(40):
        Image.fromarray(np.full((8, 8), 6 * i, np.uint8)).save(tmp_path / "img" / f"{i}.png")
        rows.append(f"img/{i}.png,a handwritten digit {['one', 'two'][i % 2]},synthetic scan number {i % 2}")
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "train.csv"


def _config(tmp_path, source, **data):
    return TrainConfig(model="mobileclip_tiny", out_dir=str(tmp_path / "run"), evaluate=False,
                       data=DataConfig(source=str(source), batch_size=8, **data))  # fmt: skip


def test_embedded_tokenizer_on_foreign_captions_is_refused_naming_words(tmp_path, digits_csv):
    with pytest.raises(ValueError, match=r"(?s)train\.csv: the 'embedded' tokenizer maps .* % .*handwritten"):
        build_task(_config(tmp_path, digits_csv, tokenizer="embedded"))


def test_words_tokenizer_from_captions_and_vocabulary_follows(tmp_path, digits_csv):
    config = _config(tmp_path, digits_csv, tokenizer="words", synthetic_keys=("syn0",))
    inputs = prepare_run(config, get_model_config("mobileclip_tiny"))
    words = inputs.tokenizer.words[2:-2]
    assert {"handwritten", "synthetic", "scan", "0", "1"} <= set(words) and inputs.unknown_rate == 0.0
    assert not (tmp_path / "run").exists()  # checking writes nothing; the run keeps its tokenizer once it starts
    assert tokenizer_from_spec(json.loads(save_tokenizer(config, inputs.tokenizer).read_text())).words == inputs.tokenizer.words
    task = build_task(config, inputs)
    assert task.student.config.text.vocab_size == len(words) + 4 and task.student.config.text.tokenizer == "words"
    clip = build_task(_config(tmp_path, digits_csv, tokenizer="clip"))
    assert clip.student.config.text.vocab_size == 49408  # the tiny model takes CLIP's vocabulary


def test_synthetic_columns_reach_the_dataset(tmp_path, digits_csv):
    from siclip.data import ImageTextDataset

    config = _config(tmp_path, digits_csv, tokenizer="words", synthetic_keys=("syn0",), p_synthetic=1.0)
    inputs = prepare_run(config, get_model_config("mobileclip_tiny"))
    sample = ImageTextDataset(inputs.source, inputs.tokenizer, p_synthetic=1.0)[3]
    assert sample["caption"] == "synthetic scan number 1" and sample["caption_index"] == 1


def test_teacher_tokenizer_is_used_and_a_different_one_refused(tmp_path, digits_csv):
    teacher = create_model("mobileclip_tiny")
    path = save_checkpoint(teacher, tmp_path / "teacher.pt", tokenizer={"name": "clip", "context_length": 32})
    config = _config(tmp_path, digits_csv, synthetic_keys=("syn0",))
    config.teacher = str(path)
    with pytest.raises(ValueError, match="does not fit model 'mobileclip_tiny'.*the teacher's vocabulary of 256"):
        prepare_run(config, get_model_config("mobileclip_tiny"))  # CLIP ids in a 256-word teacher: one message
    config.data.tokenizer = "words"  # the teacher still reads its own (broken) tokenizer's ids
    with pytest.raises(ValueError, match="the teacher's tokenizer 'clip' has 49408 ids"):
        prepare_run(config, get_model_config("mobileclip_tiny"))


def test_a_student_with_its_own_tokenizer_distils_from_a_teacher_reading_its_own_ids(tmp_path, digits_csv):
    """Without weight inheritance the student may tokenize its own way; the batch then carries the teacher's ids."""
    teacher = create_model("mobileclip_tiny", text={"vocab_size": 49408, "tokenizer": "clip"})
    path = save_checkpoint(teacher, tmp_path / "teacher.pt", tokenizer={"name": "clip", "context_length": 32})
    config = _config(tmp_path, digits_csv, synthetic_keys=("syn0",), tokenizer="words")
    config.teacher = str(path)
    inputs = prepare_run(config, get_model_config("mobileclip_tiny"))
    assert inputs.tokenizer.name == "words" and inputs.teacher_tokenizer.name == "clip"
    from siclip.train.loop import build_data

    batch = next(iter(build_data(config, inputs, 64, 0, 1)))
    captions = batch["caption"]
    assert torch.equal(batch["teacher_ids"], inputs.teacher_tokenizer(captions)) and torch.equal(batch["text"], inputs.tokenizer(captions))
    assert batch["image"].dtype == torch.uint8  # each model normalises the crops itself
    config.model, config.model_overrides = "siclip_tiny", {"siclip": {"convert": ["text"]}}
    with pytest.raises(ValueError, match="inherits the teacher's token embeddings, which were trained with the 'clip' tokenizer"):
        prepare_run(config, get_model_config("siclip_tiny", siclip={"convert": ["text"]}))


@pytest.mark.slow
def test_apple_layout_teacher_on_the_command_line(tmp_path, digits_csv):
    """--teacher accepts Apple's mobileclip_s0.pt layout: the SiCLIP-S0 student inherits it, CLIP BPE by default."""
    torch.save(to_apple_state_dict(create_model("mobileclip_s0")), tmp_path / "mobileclip_s0.pt")
    config = TrainConfig(model="siclip_s0", teacher=str(tmp_path / "mobileclip_s0.pt"), out_dir=str(tmp_path / "run"),
                         data=DataConfig(source=str(digits_csv), batch_size=8))  # fmt: skip
    inputs = prepare_run(config, get_model_config("siclip_s0"))
    assert inputs.tokenizer.name == "clip" and inputs.tokenizer.vocab_size == 49408
    task = build_task(config, inputs)
    assert task.student.config.text.vocab_size == 49408


def test_a_wider_distillation_teacher_distils_while_the_student_inherits_from_the_teacher(tmp_path):
    """--distill-teacher: the student inherits from --teacher (128 wide) and distils from a 192-wide model, through FD's
    learned maps; one forward gives every term."""
    from siclip.distill import ObjectiveConfig
    from siclip.train.loop import build_data
    from siclip.train.step import forward_terms

    torch.manual_seed(0)
    source = create_model("mobileclip_tiny", image={"image_size": 32})
    wide = create_model("mobileclip_tiny", image={"image_size": 32}, embed_dim=192)
    config = TrainConfig(model="siclip_tiny", teacher=str(save_checkpoint(source, tmp_path / "teacher.pt")), out_dir=str(tmp_path / "run"),
                         distill_teacher=str(save_checkpoint(wide, tmp_path / "wide.pt")), objective=ObjectiveConfig(), evaluate=False,
                         calibration_captions=4, data=DataConfig(num_train=8, batch_size=4))  # fmt: skip
    inputs = prepare_run(config, get_model_config("siclip_tiny"))
    task = build_task(config, inputs)
    assert task.teacher.model.embed_dim == 192 and task.student.embed_dim == 128
    assert (task.objective.feature.image_proj.in_features, task.objective.feature.image_proj.out_features) == (128, 192)
    assert torch.equal(task.student.text.token_embedding.weight, source.text.token_embedding.weight)  # inherited from --teacher
    batch = next(iter(build_data(config, inputs, task.student.preprocess.size, 0, 1)))
    terms = forward_terms(task, batch, bf16=False)
    assert set(terms) == {"clip", "feature", "relation", "interactive", "pair_matching", "total"} and torch.isfinite(terms["total"])
