"""Real users' files: every PIL mode, CSV quirks, shards written from a CSV read back."""

import io

import numpy as np
import pytest
from PIL import Image

from siclip.data import CsvSource, ShardSource, decode_image, open_source, write_shards
from siclip.data.sources import sniff_image_format


def _encode(img: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt)
    return buffer.getvalue()


def test_sixteen_bit_grayscale_keeps_its_grey_levels(seed):
    rng = np.random.default_rng(seed)
    wide = rng.integers(0, 65536, (12, 10), dtype=np.uint16)
    data = _encode(Image.fromarray(wide), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")  # PIL's convert("RGB") would clip this to white
    rgb = decode_image(data, "scan.png")
    expected = np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8)
    assert rgb.shape == (12, 10, 3) and rgb.dtype == np.uint8
    for channel in range(3):
        np.testing.assert_array_equal(rgb[..., channel], expected)


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "YCbCr", "I", "F", "I;16"])
def test_every_pil_mode_decodes_to_the_same_rgb(seed, mode):
    """An 8-bit grey/colour image saved in any mode comes back as (nearly) the grey levels it had."""
    rng = np.random.default_rng(seed)
    grey = rng.integers(0, 256, (9, 7), dtype=np.uint8)
    if mode == "1":
        grey = np.where(grey > 127, 255, 0).astype(np.uint8)
    base = Image.fromarray(grey)
    if mode == "I":
        img = Image.fromarray(grey.astype(np.int32) * 257)
    elif mode == "I;16":
        img = Image.fromarray(grey.astype(np.uint16) * 257)
    elif mode == "F":
        img = Image.fromarray(grey.astype(np.float32) / 255)
    else:
        img = base.convert(mode)
    fmt = {"CMYK": "TIFF", "YCbCr": "TIFF", "I": "TIFF", "F": "TIFF"}.get(mode, "PNG")
    data = _encode(img, fmt)
    rgb = decode_image(data, f"x.{fmt.lower()}")
    assert rgb.shape == (9, 7, 3) and rgb.dtype == np.uint8
    tolerance = 2 if mode in ("CMYK", "YCbCr") else 0  # colour-space round trips lose a level or two
    assert np.abs(rgb.astype(int) - grey[..., None].astype(int)).max() <= tolerance, mode


def test_sniffed_format_is_the_encoding_not_the_name():
    img = Image.fromarray(np.zeros((4, 4, 3), np.uint8))
    assert sniff_image_format(_encode(img, "PNG")) == "png"
    assert sniff_image_format(_encode(img, "JPEG")) == "jpg"
    assert sniff_image_format(b"not an image") is None


def _folder_csv(tmp_path, name="train.csv"):
    (tmp_path / "png32").mkdir(exist_ok=True)
    rows = ["filepath,title,syn0,syn1"]
    for i in range(6):
        fmt = ["PNG", "JPEG", "BMP"][i % 3]
        ext = {"PNG": "png", "JPEG": "jpg", "BMP": "bmp"}[fmt]
        (tmp_path / "png32" / f"{i:05d}.{ext}").write_bytes(_encode(Image.fromarray(np.full((8, 8, 3), 30 * i, np.uint8)), fmt))
        rows.append(f"png32/{i:05d}.{ext},a digit {i},synthetic {i} a,synthetic {i} b")
    (tmp_path / name).write_text("\n".join(rows) + "\n")
    return tmp_path / name


def test_shards_written_from_a_csv_read_back(tmp_path):
    source = CsvSource(_folder_csv(tmp_path), synthetic_keys=["syn0", "syn1"])
    write_shards(source, tmp_path / "shards", samples_per_shard=4, progress=False)
    back = ShardSource(tmp_path / "shards")
    assert len(back) == len(source) == 6 and not back.problems
    for i in range(6):
        original, again = source.load(i), back.load(i)
        assert again.raw_caption == original.raw_caption and again.synthetic == original.synthetic
        assert again.meta["key"] == original.key  # the source's own key survives in the json member
        np.testing.assert_array_equal(decode_image(again.image, again.key), decode_image(original.image, original.key))
    assert back.load(2).key == "png32_00002_bmp"  # BMP re-encoded under a name the reader knows


def test_csv_names_any_case_and_synthetic_columns(tmp_path):
    upper = _folder_csv(tmp_path, "TRAIN.CSV")
    source = open_source(str(upper), synthetic_keys=["syn0", "syn1"])
    assert isinstance(source, CsvSource) and source.load(3).synthetic == ["synthetic 3 a", "synthetic 3 b"]
    tsv = tmp_path / "Data.TSV"
    tsv.write_text(upper.read_text().replace(",", "\t"))
    assert open_source(str(tsv)).load(0).raw_caption == "a digit 0"


@pytest.mark.parametrize("body", ["a.png,cap,extra\nb.png,cap2\n", "a.png,cap\nb.png\n", "a.png\n"])
def test_ragged_rows_are_errors_even_the_first(tmp_path, body):
    path = tmp_path / "ragged.csv"
    path.write_text("filepath,title\n" + body)
    with pytest.raises(ValueError, match=r"ragged\.csv: unreadable CSV: line \d has \d fields but the header has 2"):
        CsvSource(path)
