"""Each model's own pixels (issue 23): the view, where it travels (config, checkpoints, teachers, caches), and the
evaluation traps found on real scans (unknown prompt words, numbered class folders, tied scores)."""

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_image
from torch import nn
from torch.nn import functional as F

from siclip.data import EmbeddedConfig, EmbeddedSource, Preprocess, TeacherCache, build_teacher_cache, create_tokenizer, model_pixels
from siclip.data import preprocess_image
from siclip.data.transforms import CLIP_MEAN, CLIP_STD
from siclip.distill import FrozenTeacher, ObjectiveConfig, SiCLIPObjective
from siclip.eval import retrieval, zero_shot_dataset
from siclip.eval.metrics import recall_at_k
from siclip.models import build_siclip, create_model, load_checkpoint, save_checkpoint
from siclip.train.task import TrainingTask

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ("china.jpg", "flower.jpg")


def apple_view(image: np.ndarray, size: int = 256) -> torch.Tensor:
    """Apple's MobileCLIP preprocessing written out with PIL: torchvision's Resize(size) on a PIL image (bilinear,
    short side to ``size``, long side int(size·long/short)), CenterCrop(size) (top = round((h − size)/2)), ToTensor()."""
    pil = Image.fromarray(image)
    w, h = pil.size
    new = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    pil = pil.resize(new, Image.BILINEAR)
    w, h = pil.size
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    crop = pil.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(crop, dtype=np.float64) / 255.0).permute(2, 0, 1)


@pytest.mark.parametrize("name", PHOTOS)
def test_mobileclip_s0_view_of_a_real_photo_is_apples(name):
    image = load_sample_image(name)
    for model in ("mobileclip_s0", "siclip_s0"):
        view = preprocess_image(image, create_model(model).preprocess)
        assert view.shape == (3, 256, 256) and 0.0 <= view.min() and view.max() <= 1.0
        torch.testing.assert_close(view.double(), apple_view(image), rtol=0, atol=1e-6)


def test_clip_normalised_view_and_squash(seed):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    pre = Preprocess(size=24, resize=30, interpolation="bicubic")
    pil = Image.fromarray(image).resize((int(30 * 53 / 37), 30), Image.BICUBIC)
    top, left = int(round((30 - 24) / 2)), int(round((pil.size[0] - 24) / 2))
    crop = np.asarray(pil, dtype=np.float64)[top : top + 24, left : left + 24] / 255
    expected = (torch.from_numpy(crop).permute(2, 0, 1) - torch.tensor(CLIP_MEAN, dtype=torch.float64)[:, None, None])
    expected = expected / torch.tensor(CLIP_STD, dtype=torch.float64)[:, None, None]
    torch.testing.assert_close(preprocess_image(image, pre).double(), expected, rtol=0, atol=1e-5)
    squashed = preprocess_image(image, Preprocess(size=16, resize_mode="squash", mean=(0,) * 3, std=(1,) * 3))
    reference = np.asarray(Image.fromarray(image).resize((16, 16), Image.BILINEAR), dtype=np.float64) / 255
    torch.testing.assert_close(squashed.double(), torch.from_numpy(reference).permute(2, 0, 1), rtol=0, atol=1e-6)


def test_preprocess_validation_and_scaling():
    assert Preprocess(size=256, resize=288).at(128).resize == 144 and Preprocess().at(64) == Preprocess(size=64)
    for bad, match in [({"interpolation": "lanczos"}, "interpolation"), ({"resize_mode": "longest"}, "resize_mode"),
                       ({"std": (1, 0, 1)}, "std > 0"), ({"resize": 300}, "leave resize None")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            Preprocess(**bad)
    with pytest.raises(ValueError, match="unknown preprocess field"):
        Preprocess.from_dict({"crop_pct": 0.9})
    with pytest.raises(ValueError, match="larger than the resized image"):
        preprocess_image(np.zeros((20, 20, 3), np.uint8), Preprocess(size=16, resize=12))


def test_preprocessing_travels_in_checkpoints_and_old_ones_load_with_clip_normalisation(tmp_path):
    s0 = create_model("mobileclip_s0", image={"layers": [1, 1, 1, 1]}, text={"layers": 1})
    assert s0.preprocess == Preprocess(size=256, mean=(0.0,) * 3, std=(1.0,) * 3)
    assert load_checkpoint(save_checkpoint(s0, tmp_path / "s0.pt")).preprocess == s0.preprocess
    tiny = create_model("mobileclip_tiny", preprocess={"mean": [0.5] * 3, "std": [0.25] * 3})
    assert load_checkpoint(save_checkpoint(tiny, tmp_path / "tiny.pt")).preprocess.std == (0.25,) * 3
    payload = torch.load(tmp_path / "tiny.pt", weights_only=True)
    del payload["config"]["preprocess"]  # as every checkpoint before this change
    torch.save(payload, tmp_path / "old.pt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        old = [load_checkpoint(tmp_path / "old.pt") for _ in range(2)]
    said = [w for w in caught if "old.pt was saved before models carried their preprocessing" in str(w.message)]
    assert len(said) == 1 and old[0].preprocess == Preprocess(size=64, mean=CLIP_MEAN, std=CLIP_STD)


def test_a_student_inherits_its_teachers_preprocessing():
    teacher = create_model("mobileclip_tiny", preprocess={"mean": [0.0] * 3, "std": [1.0] * 3}, image={"image_size": 32})
    student, _ = build_siclip(teacher)
    assert student.preprocess == teacher.preprocess == Preprocess(size=32, mean=(0.0,) * 3, std=(1.0,) * 3)


class Spy(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.pixels = model, []
        self.preprocess, self.embed_dim, self.name = model.preprocess, model.embed_dim, model.name

    def encode_image(self, pixels):
        self.pixels.append(pixels.clone())
        return self.model.encode_image(pixels)

    def encode_text(self, ids):
        return self.model.encode_text(ids)

    def scale(self):
        return self.model.scale()

    def forward(self, pixels, ids):
        return self.encode_image(pixels), self.encode_text(ids), self.scale()


def test_in_a_wikd_step_teacher_and_student_each_get_their_own_pixels_of_the_same_crop(seed):
    """An Apple-preprocessed teacher receives [0, 1] pixels; a CLIP-normalised student its own normalisation; a
    teacher of another input size the same crop resized."""
    apple = {"mean": [0.0] * 3, "std": [1.0] * 3}
    teacher = Spy(create_model("mobileclip_tiny", preprocess=apple, image={"image_size": 48}))
    student = Spy(create_model("mobileclip_tiny"))
    task = TrainingTask(student, SiCLIPObjective(128, 128, ObjectiveConfig()), FrozenTeacher(teacher))
    crops = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    terms = task({"image": crops, "text": torch.randint(1, 200, (4, 32))})
    assert torch.isfinite(terms["total"])
    seen_t, seen_s = teacher.pixels[0].double(), student.pixels[0].double()
    resized = F.interpolate(crops.double(), size=(48, 48), mode="bilinear", antialias=True, align_corners=False) / 255
    torch.testing.assert_close(seen_t, resized, rtol=0, atol=1e-5)
    assert seen_t.min() >= -1e-6 and seen_t.max() <= 1 + 1e-6
    mean, std = torch.tensor(CLIP_MEAN, dtype=torch.float64), torch.tensor(CLIP_STD, dtype=torch.float64)
    torch.testing.assert_close(seen_s, (crops.double() / 255 - mean[:, None, None]) / std[:, None, None], rtol=0, atol=1e-5)
    same = model_pixels(crops, Preprocess(size=64))  # the same size takes the loader's old operations exactly
    assert torch.equal(same, crops.float().mul_(torch.tensor([1 / (255 * s) for s in CLIP_STD]).view(3, 1, 1)).add_(
        torch.tensor([-m / s for m, s in zip(CLIP_MEAN, CLIP_STD)]).view(3, 1, 1)))  # fmt: skip


def test_a_teacher_cache_made_under_one_preprocessing_is_refused_under_another(tmp_path):
    teacher = create_model("mobileclip_tiny").eval()
    source = EmbeddedSource(EmbeddedConfig(num_val=6), "val")
    path = build_teacher_cache(source, teacher.encode_image, teacher.encode_text, create_tokenizer(), tmp_path / "cache",
                               preprocess=teacher.preprocess, progress=False)  # fmt: skip
    assert TeacherCache(path, preprocess=teacher.preprocess).meta["preprocess"]["mean"] == list(CLIP_MEAN)
    apple = Preprocess(size=64, mean=(0.0,) * 3, std=(1.0,) * 3)
    with pytest.raises(ValueError, match=r"cache was computed with Preprocess\(.*but the teacher expects"):
        TeacherCache(path, preprocess=apple)
    meta = json.loads((path / "meta.json").read_text())
    del meta["preprocess"]  # a cache written before caches recorded it
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="records no preprocessing"):
        TeacherCache(path, preprocess=teacher.preprocess)


def _image(path: Path, level: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), level, np.uint8)).save(path)


def test_numbered_class_folders_take_names_in_numeric_order(tmp_path):
    for n in range(12):
        _image(tmp_path / "digits" / str(n) / "a.png", 20 * n)
    with pytest.warns(UserWarning, match="class folders are all numbers, so they take class names in numeric order"):
        source, labels, names = zero_shot_dataset(tmp_path / "digits", [f"class {n}" for n in range(12)])
    assert [source.load(i).key.split("/")[0] for i in range(12)] == [str(n) for n in range(12)] and labels.tolist() == list(range(12))
    for n in (1, 2):
        _image(tmp_path / "few" / str(n) / "a.png", n)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same order either way: nothing to say
        zero_shot_dataset(tmp_path / "few")


def test_tied_scores_are_counted(seed):
    shared = F.normalize(torch.randn(1, 8), dim=-1)
    images = F.normalize(torch.cat([shared + 0.05 * torch.randn(2, 8), torch.randn(2, 8)]), dim=-1)
    texts = torch.cat([shared, shared, F.normalize(torch.randn(2, 8), dim=-1)])  # images 0 and 1 share one caption
    got = recall_at_k(images, texts, torch.arange(4), ks=(1,), ties=True)
    sim = images @ texts.T
    expected = sum(int(torch.sort(row, descending=True).values[0] == torch.sort(row, descending=True).values[1]) for row in sim)
    assert got["image_to_text_ties@1"] == expected and expected >= 2  # whoever ranks the shared caption first ties
    assert got["text_to_image_ties@1"] == 0


def test_retrieval_json_reports_ties(tmp_path):
    for i in range(3):
        _image(tmp_path / "img" / f"{i}.png", 40 * i)
    # every image has the same caption: whichever caption an image ranks first ties with the other two
    rows = ["filepath,title", "img/0.png,a dark square", "img/1.png,a dark square", "img/2.png,a dark square"]
    (tmp_path / "ret.csv").write_text("\n".join(rows) + "\n")
    model = create_model("mobileclip_tiny", image={"image_size": 32}, text={"vocab_size": 49408, "tokenizer": "clip"}).eval()
    metrics = retrieval(model, create_tokenizer("clip", context_length=32), tmp_path / "ret.csv")
    assert metrics["text_retrieval_ties@1"] == 3 and "image_retrieval_ties@1" in metrics


def test_evaluate_refuses_prompts_the_tokenizer_cannot_read(tmp_path):
    """CLIP's 80 default prompts under a words tokenizer built from the class names: mostly <unk>, refused in one line."""
    model = create_model("mobileclip_tiny", image={"image_size": 32}, text={"vocab_size": 16, "tokenizer": "words"})
    names = ["zero", "one"]
    checkpoint = save_checkpoint(model, tmp_path / "m.pt", tokenizer={"name": "words", "context_length": 32, "words": names})
    for n in names:
        _image(tmp_path / "test" / n / "a.png", 100)
    command = [sys.executable, str(ROOT / "experiments" / "evaluate.py"), "--model", str(checkpoint), "--zeroshot", str(tmp_path / "test")]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 2 and "maps" in done.stderr and "% of the prompt tokens to <unk>" in done.stderr, done.stderr
    assert done.stderr.strip().count("\n") == 0 and "Traceback" not in done.stderr
    assert "the folder names (no --classnames was given)" in done.stderr and "--tokenizer" not in done.stderr  # evaluate has none
    (tmp_path / "t.txt").write_text("{}\n")
    ok = subprocess.run(command + ["--templates", str(tmp_path / "t.txt")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
