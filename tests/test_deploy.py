"""Export to ONNX and ONNX Runtime (``siclip.deploy``): the traced attention paths against float64 references, every
kind of block siclip builds exported and run under ``onnxruntime`` against PyTorch in float64, shared weights as one
initializer, the Triton custom ops kept out, the exported directory as a CLIP (``load_clip``), int8, bad input."""

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from einops import rearrange

from helpers import padding_mask, randomized
from siclip.blocks import Attention, SASPBlock, shaped_attention, shaped_attention_reference
from siclip.blocks import backends
from siclip.blocks.backends import TRACEABLE, in_cached_chunks, resolve_backend, traced_attention, traced_kernel
from siclip.data.tokenizer import tokenizer_for
from siclip.models import create_model, reparameterize_model

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import onnx  # noqa: E402
from onnx import numpy_helper  # noqa: E402

from siclip.deploy import (  # noqa: E402
    MANIFEST, MAX_RELATIVE_ERROR, ExportCheckError, OnnxClip, create_session, export_clip, export_encoder, max_relative_error,
    read_manifest, sample_images,
)  # fmt: skip
from siclip.deploy.export import Encoder, file_opset  # noqa: E402

ROOT = Path(__file__).parent.parent


# ── the paths an exporter traces, in PyTorch ─────────────────────────────────────────────────────────────────────


def test_traced_attention_names_one_kernel_whatever_the_backend(monkeypatch):
    x = torch.empty(1, 2, 8, 4)
    monkeypatch.setattr(backends, "triton_runs_on", lambda x: pytest.fail("the Triton kernels were consulted while tracing"))
    assert traced_kernel() is None
    with traced_attention("math"):
        assert [resolve_backend(b, x, True, autograd=False) for b in backends.BACKENDS] == ["math"] * len(backends.BACKENDS)
        with traced_attention("sdpa"):  # nested: the inner one holds, the outer one comes back
            assert resolve_backend("triton", x, False) == "sdpa"
        assert traced_kernel() == "math"
    assert traced_kernel() is None and resolve_backend("sdpa", x, False) == "sdpa"
    with pytest.raises(ValueError, match="triton"):
        with traced_attention("triton"):
            pass


def test_traced_attention_runs_the_batch_whole():
    """A running model splits a large CPU batch into cache-sized chunks; a traced one never does (its batch is a symbol)."""
    calls = []

    def fn(q, k, v, mask):
        calls.append(len(q))
        return v.clone()

    q = torch.randn(40, 4, 64, 8)  # 4·64² scores per sequence: chunks of 16 sequences when running
    in_cached_chunks(fn, q, q, q, None, autograd=False)
    assert calls == [16, 16, 8]
    calls.clear()
    with traced_attention("math"):
        in_cached_chunks(fn, q, q, q, None, autograd=False)
    assert calls == [40]


@pytest.mark.parametrize("kernel", TRACEABLE)
@pytest.mark.parametrize("causal, padded", [(False, False), (False, True), (True, False), (True, True)])
def test_traced_shaped_attention_matches_the_float64_reference(kernel, causal, padded, seed):
    q, k, v = (torch.randn(3, 4, 9, 8) for _ in range(3))
    alpha, beta, gamma = (torch.randn(4) for _ in range(3))
    mask = padding_mask(3, 9) if padded else None
    with torch.no_grad(), traced_attention(kernel):
        out = shaped_attention(q, k, v, alpha, beta, gamma, causal=causal, key_padding_mask=mask, backend="triton")
    ref = shaped_attention_reference(*(t.double() for t in (q, k, v, alpha, beta, gamma)), causal=causal, key_padding_mask=mask)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel", TRACEABLE)
def test_traced_softmax_attention_and_sasp_block_match_float64(kernel, seed):
    """Pre-LN's attention (softmax(QKᵀ/√d + M)·V·W_P, written out) and a whole SAS-P block (its traced MLP sum is a
    plain product and sum) under each traced kernel, with padding."""
    x, mask = torch.randn(3, 9, 32), padding_mask(3, 9)
    attention = randomized(Attention(32, 4), seed)
    with torch.no_grad(), traced_attention(kernel):
        out = attention(x, key_padding_mask=mask)
    q, k, v = rearrange(x.double() @ attention.qkv.weight.double().T + attention.qkv.bias.double(), "b t (n h d) -> n b h t d", n=3, h=4)
    logits = (q @ k.transpose(-2, -1)) / 8**0.5 + torch.where(mask, float("-inf"), 0.0).double()[:, None, None, :]
    ref = rearrange(logits.softmax(-1) @ v, "b h t d -> b t (h d)") @ attention.proj.weight.double().T + attention.proj.bias.double()
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)

    block = randomized(SASPBlock(32, 4, mlp_bias=True, act="gelu"), seed)
    with torch.no_grad():
        reference = copy.deepcopy(block).double()(x.double(), key_padding_mask=mask)
        with traced_attention(kernel):
            out = block(x, key_padding_mask=mask)
    torch.testing.assert_close(out.double(), reference, atol=1e-5, rtol=1e-5)


# ── every kind of block, exported and run under ONNX Runtime ─────────────────────────────────────────────────────


def fused_tiny(name: str, seed: int, **text) -> torch.nn.Module:
    """A tiny model with random weights and BatchNorm statistics everywhere, reparameterised."""
    return reparameterize_model(randomized(create_model(name, text=text), seed).eval())


def random_ids(batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """Token ids whose end-of-text token (255, the largest) sits anywhere, zeros (padding) after it."""
    ids = torch.randint(1, 200, (batch, length), generator=generator)
    ends = torch.randint(1, length, (batch,), generator=generator)
    ids[torch.arange(batch), ends] = 255
    ids[torch.arange(length)[None, :] > ends[:, None]] = 0
    return ids


CASES = [  # (model, encoder, mask_padding, kernel): each block kind under each traced kernel (the SAS-P image blocks and
    # padded SAS-P text blocks under "math" are in test_triton_and_xformers_backends_export_the_traced_kernel)
    ("siclip_tiny", "image", False, "sdpa"),  # SAS-P 2-d blocks sharing W_Q, W_K; RepCPE, MobileOne, RepMixer stages
    ("siclip_tiny", "text", True, "sdpa"),  # SAS-P text blocks shared in pairs, padding masks, end-of-text pooling
    ("siclip_tiny", "text", False, "sdpa"),  # attention over every position (Apple's MCt)
    ("siclip_tiny", "text", False, "math"),
    ("mobileclip_tiny", "image", False, "sdpa"),  # MCi's attention blocks (W_V, W_P, layer scales)
    ("mobileclip_tiny", "text", True, "math"),  # Pre-LN blocks with padding masks
]


@pytest.mark.slow
@pytest.mark.parametrize("name, encoder, mask_padding, kernel", CASES)
def test_exported_encoder_matches_pytorch_float64_under_onnxruntime(tmp_path, name, encoder, mask_padding, kernel, seed):
    fused = fused_tiny(name, seed, mask_padding=mask_padding)
    module = Encoder(fused, encoder).eval()
    g = torch.Generator().manual_seed(seed)
    if encoder == "image":
        inputs = [torch.randn(b, 3, 64, 64, generator=g) for b in (2, 1, 3)]
    else:
        inputs = [random_ids(b, 32, g) for b in (2, 1, 3)]
    path = export_encoder(module, inputs[0], tmp_path / "encoder.onnx", attention=kernel)
    graph = onnx.load(path)
    assert {o.domain for o in graph.opset_import} <= {"", "ai.onnx"}  # standard operators only
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a symbolic batch axis
    assert ("Attention" in {n.op_type for n in graph.graph.node}) == (kernel == "sdpa")  # opset 23's op, or explicit products
    session = create_session(path)
    reference = copy.deepcopy(module).double()
    for batch in inputs:  # the traced batch, and two others
        with torch.no_grad():
            expected = reference(batch.double() if encoder == "image" else batch).numpy()
        out = session.run(None, {session.get_inputs()[0].name: batch.numpy()})[0]
        assert out.shape == expected.shape and out.dtype == np.float32
        assert max_relative_error(out, expected) <= MAX_RELATIVE_ERROR


def test_max_relative_error_is_per_row_against_the_reference():
    reference = np.array([[1.0, -2.0, 0.5], [1e-3, 0.0, 0.0]])
    ours = reference + np.array([[0.02, 0.0, 0.0], [0.0, 0.0, 1e-5]])
    assert max_relative_error(ours, reference) == pytest.approx(max(0.02 / 2.0, 1e-5 / 1e-3))  # the small row counts as much
    assert max_relative_error(reference, reference) == 0.0
    with pytest.raises(ExportCheckError, match="shape"):
        max_relative_error(reference[:1], reference)


# ── export_clip: the directory, the check, sharing, the runtime adapter ─────────────────────────────────────────


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """siclip_tiny with padded text attention and random weights, exported (with int8) once for the tests below."""
    torch.manual_seed(0)
    model = randomized(create_model("siclip_tiny", text={"mask_padding": True}), seed=0).eval()
    tokenizer = tokenizer_for(model.config.text)
    out = tmp_path_factory.mktemp("export") / "onnx"
    done = export_clip(model, tokenizer, out, quantize="int8", source="tiny.pt")
    return model, tokenizer, done


def initializers(path: Path) -> list[np.ndarray]:
    return [numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer]


def occurrences(weight: torch.Tensor, arrays: list[np.ndarray]) -> int:
    """How many initializers hold ``weight`` (as it is, or transposed as a product's right operand)."""
    w = weight.detach().numpy()
    return sum(any(a.shape == c.shape and np.array_equal(a, c) for c in (w, w.T)) for a in arrays)


@pytest.mark.slow
def test_exported_directory_holds_checked_encoders_and_a_plain_manifest(exported):
    model, tokenizer, done = exported
    manifest = json.loads((done.directory / MANIFEST).read_text())
    assert manifest == done.manifest and read_manifest(done.directory) == manifest
    assert sorted(p.name for p in done.directory.iterdir()) == ["image.onnx", "int8", MANIFEST, "text.onnx"]
    assert manifest["name"] == "siclip_tiny" and manifest["embed_dim"] == 128 and manifest["precision"] == "float32"
    assert manifest["logit_scale"] == pytest.approx(model.logit_scale.item())
    assert manifest["preprocess"] == model.preprocess.to_dict() and manifest["tokenizer"] == {"name": "embedded", "context_length": 32}
    assert manifest["image"]["input_shape"] == [None, 3, 64, 64] and manifest["text"]["input_shape"] == [None, 32]
    assert manifest["opset"] == file_opset(done.directory / "image.onnx") == file_opset(done.directory / "text.onnx") == 23  # the files' own
    errors = manifest["check"]["max_relative_error"]
    assert set(errors) == {"image", "text"} and all(0 <= e <= MAX_RELATIVE_ERROR for e in errors.values())
    assert not any(p.name.startswith(".onnx.") for p in done.directory.parent.iterdir())  # no temporary left behind


@pytest.mark.slow
def test_shared_weights_are_one_initializer(exported):
    """Text blocks 0 and 1 share a whole block, image blocks 0 and 1 share W_Q and W_K but not their ConvFFNs: each
    shared tensor is stored once, each unshared twin once per block (random weights: no two tensors coincide)."""
    model, _, done = exported
    fused = reparameterize_model(copy.deepcopy(model))
    text, image = initializers(done.directory / "text.onnx"), initializers(done.directory / "image.onnx")
    first, second = fused.text.transformer[0], fused.text.transformer[1]
    assert first is second
    for weight in (first.attn.q.weight, first.attn.k.weight, first.mlp.fc1.weight):
        assert occurrences(weight, text) == 1
    blocks = fused.visual.network[7]
    assert blocks[0].attn.q.weight is blocks[1].attn.q.weight
    assert occurrences(blocks[0].attn.q.weight, image) == 1 and occurrences(blocks[0].attn.k.weight, image) == 1
    assert occurrences(blocks[0].ffn.fc1.weight, image) == 1 and occurrences(blocks[1].ffn.fc1.weight, image) == 1
    # In all: the text file stores the fused tower's distinct weights, not a copy of a shared block per use.
    distinct = sum(p.numel() for p in fused.text.parameters())  # parameters() lists a shared tensor once
    copies = sum(p.numel() for block in fused.text.transformer for p in block.parameters()) - sum(
        p.numel() for p in fused.text.transformer.parameters())  # what one copy per use would add
    stored = sum(a.size for a in text if a.dtype == np.float32)
    assert copies > 100_000 and abs(stored - distinct) < copies / 100, (stored, distinct, copies)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:xformers was asked for on a cpu tensor")  # the eager reference falls back to SDPA
def test_triton_and_xformers_backends_export_the_traced_kernel(tmp_path, seed):
    """Blocks built for the Triton kernels (or xformers) export the named kernel: no custom op reaches the graph."""
    fused = fused_tiny("siclip_tiny", seed, mask_padding=True)
    for module in fused.modules():
        if hasattr(module, "backend"):
            module.backend = "triton"
    fused.visual.network[7][0].attn.shaped.backend = "xformers"
    g = torch.Generator().manual_seed(seed)
    for encoder, inputs in (("text", [random_ids(b, 32, g) for b in (2, 3)]), ("image", [torch.randn(b, 3, 64, 64, generator=g) for b in (2, 3)])):
        module = Encoder(fused, encoder).eval()
        path = export_encoder(module, inputs[0], tmp_path / "encoder.onnx", attention="math")
        graph = onnx.load(path).graph
        assert {n.domain for n in graph.node} <= {""}, {n.domain for n in graph.node}
        session = create_session(path)
        for batch in inputs:  # the traced batch and another
            with torch.no_grad():
                expected = module(batch).numpy()  # eager: the Triton kernels under their interpreter
            assert max_relative_error(session.run(None, {graph.input[0].name: batch.numpy()})[0], expected) <= MAX_RELATIVE_ERROR
    assert fused.text.transformer[0].attn.shaped.backend == "triton"  # the model itself is left as it was


@pytest.mark.slow
def test_load_clip_runs_the_exported_directory_as_a_clip(exported):
    from siclip.eval.run import _device, _dtype
    from siclip.interop import load_clip

    model, tokenizer, done = exported
    loaded = load_clip(f"{done.directory}/")
    clip = loaded.model
    assert isinstance(clip, OnnxClip) and loaded.tokenizer_spec == done.manifest["tokenizer"] and loaded.tokenizer.name == "embedded"
    assert clip.preprocess == model.preprocess and clip.embed_dim == 128 and clip.name == "siclip_tiny (ONNX)"
    assert float(clip.scale()) == pytest.approx(model.scale().item())
    assert _device(clip) == torch.device("cpu") and _dtype(clip) == torch.float32 and not list(clip.parameters())
    from siclip.data.transforms import preprocess_image

    pixels = torch.stack([preprocess_image(image, model.preprocess) for image in sample_images()])
    ids = tokenizer(["a red circle", "two blue squares on a striped background", "a green star"])
    with torch.no_grad():
        for ours, theirs in ((clip.encode_image(pixels), model.encode_image(pixels)), (clip.encode_text(ids), model.encode_text(ids))):
            assert ours.dtype == torch.float32 and max_relative_error(ours.numpy(), theirs.numpy()) <= MAX_RELATIVE_ERROR
            torch.testing.assert_close(ours.norm(dim=-1), torch.ones(len(ours)))


@pytest.mark.slow
def test_int8_directory_is_smaller_and_close_to_float32(exported):
    from siclip.interop import load_clip

    model, tokenizer, done = exported
    int8 = read_manifest(done.int8)
    assert int8["precision"] == "int8" and int8["tokenizer"] == done.manifest["tokenizer"]
    for encoder in ("image", "text"):
        assert int8[encoder]["bytes"] < 0.5 * done.manifest[encoder]["bytes"]  # most weights in 1 byte instead of 4
        assert 0.99 < int8["check"]["min_cosine_to_float32"][encoder] <= 1.0 + 1e-6
    clip = load_clip(done.int8).model
    assert clip.name == "siclip_tiny (ONNX int8)"
    ops = {n.op_type for n in onnx.load(done.int8 / "text.onnx").graph.node}
    assert {"MatMulInteger", "DynamicQuantizeLinear"} <= ops and not ops & {"MatMul", "Gemm"}  # every weight product quantised


@pytest.mark.slow
def test_the_dynamic_axis_is_named_batch(exported):
    """Issue 33 row 11: the exporter named the dynamic axis ``s85``; the README says ``batch``."""
    _, _, done = exported
    for directory in (done.directory, done.int8):
        for file in ("image.onnx", "text.onnx"):
            graph = onnx.load(directory / file, load_external_data=False).graph
            assert [v.type.tensor_type.shape.dim[0].dim_param for v in (*graph.input, *graph.output)] == ["batch", "batch"]
            assert not any(d.dim_param.startswith("s") and d.dim_param[1:].isdigit() for v in graph.value_info for d in v.type.tensor_type.shape.dim)


@pytest.mark.slow
def test_int8_runs_one_sample_per_call_and_holds_its_stated_bound(exported, tmp_path, monkeypatch):
    """Issue 33 row 11: dynamic quantisation takes each activation's range over the whole call, so an image's int8
    embedding changed with the other images of its batch, and a cosine of 0.857 to float32 was recorded and accepted.
    An int8 directory now runs one sample per call (the same embedding in any batch) and the export holds every sample
    to MIN_INT8_COSINE."""
    import siclip.deploy.export as export
    from siclip.data.transforms import preprocess_image
    from siclip.deploy import MIN_INT8_COSINE
    from siclip.interop import load_clip

    model, tokenizer, done = exported
    int8 = read_manifest(done.int8)
    assert int8["activation_ranges"] == "per_sample" and int8["check"]["bound"] == MIN_INT8_COSINE == 0.7
    assert all(MIN_INT8_COSINE <= c <= 1 + 1e-6 for c in int8["check"]["min_cosine_to_float32"].values())
    import siclip.deploy.runtime as runtime

    pixels = torch.stack([preprocess_image(image, model.preprocess) for image in sample_images()])
    pixels = torch.cat([pixels, pixels[:1] * 8])  # a sample whose activations span a far wider range than the others'
    calls, real = [], runtime.run_session
    monkeypatch.setattr(runtime, "run_session", lambda session, array: calls.append(len(array)) or real(session, array))
    int8, float32 = load_clip(done.int8).model, load_clip(done.directory).model
    alone = torch.cat([int8.encode_image(pixels[i : i + 1]) for i in range(3)])
    calls.clear()
    torch.testing.assert_close(int8.encode_image(pixels), alone, rtol=0, atol=0)  # in a batch as alone
    float32.encode_image(pixels)
    assert calls == [1, 1, 1, 3]  # int8: one sample per call; float32: the batch in one call
    monkeypatch.setattr(export, "MIN_INT8_COSINE", 1.5)  # a bound no int8 export meets: refused, naming the encoder
    built = tmp_path / "built"
    built.mkdir()
    for name in ("image.onnx", "text.onnx"):
        shutil.copy(done.directory / name, built / name)
    with pytest.raises(ExportCheckError, match=r"int8/image\.onnx: the int8 image embeddings reach a cosine of only 0\.9\d+ .* \(bound 1\.5"):
        export._quantized(built, done.manifest, export._inputs(model, tokenizer, None, None))  # the int8 step of export_clip


@pytest.mark.slow  # three exports (float32 and int8), each traced, checked under ONNX Runtime and reloaded: ≈ 20 s quiet
def test_converted_hf_and_open_clip_models_export_with_the_same_check(tmp_path, capsys):
    """Issue 33 row 7: export refused a converted CLIP ("export takes a siclip checkpoint or Apple's mobileclip_s0.pt, not
    a ConvertedClip") and hf: / open_clip: models. Every model whose encoders are torch modules exports, checked the
    same way, and the exported directory runs as the model did, through the tokenizer the manifest holds."""
    from foreign_models import save_hf_clip, save_open_clip
    from siclip.commands.export import main
    from siclip.interop import load_clip
    from siclip.interop.converted import ConvertedRecipe, architecture_of, convert, load_original, save_converted

    directory = save_hf_clip(tmp_path / "hf", "clip", seed=1)
    spec = f"hf:{directory}"
    original = load_original(spec)
    recipe = ConvertedRecipe(origin=spec, architecture=architecture_of(spec, original), blocks=["text_model.encoder.layers.0",
                             "text_model.encoder.layers.1", "vision_model.encoder.layers.1"], sharing={"text_model.encoder.layers":
                             {"groups": [[0, 1]], "scope": "block"}})  # fmt: skip
    convert(original, recipe)
    save_converted(original, recipe, tmp_path / "converted.pt")
    config, weights = save_open_clip(tmp_path / "oc", seed=2)
    captions = ["a photo of a chinese temple on a hill", "a red car", "two dogs in the snow"]
    for name, model_spec in (("converted", str(tmp_path / "converted.pt")), ("hf", spec), ("open_clip", f"open_clip:{config}:{weights}")):
        out = tmp_path / f"onnx_{name}"
        assert main(["--model", model_spec, "--out", str(out), *(["--quantize", "int8"] if name == "converted" else [])]) == 0
        assert "max relative error against PyTorch" in capsys.readouterr().out
        manifest = read_manifest(out)
        assert all(0 <= e <= MAX_RELATIVE_ERROR for e in manifest["check"]["max_relative_error"].values())
        source, exported = load_clip(model_spec), load_clip(f"{out}/")
        ids = source.tokenizer(captions)
        assert torch.equal(exported.tokenizer(captions), ids)  # the tokenizer the manifest holds, rebuilt
        assert exported.model.preprocess == source.model.preprocess and float(exported.model.scale()) == pytest.approx(float(source.model.scale().detach()))
        with torch.no_grad():
            assert max_relative_error(exported.model.encode_text(ids).numpy(), source.model.encode_text(ids).numpy()) <= MAX_RELATIVE_ERROR
    assert read_manifest(tmp_path / "onnx_converted" / "int8")["activation_ranges"] == "per_sample"


@pytest.mark.slow
def test_a_check_that_fails_names_the_encoder_and_leaves_nothing(tmp_path, monkeypatch):
    import siclip.deploy.export as export

    model = create_model("siclip_tiny")
    real = export.run_session

    def off_by_a_bit(session, array):  # as if the image graph computed something slightly different
        out = real(session, array)
        return out * 1.001 if session.get_inputs()[0].name == "pixel_values" else out

    monkeypatch.setattr(export, "run_session", off_by_a_bit)
    with pytest.raises(ExportCheckError, match=r"image\.onnx: ONNX Runtime's image embeddings differ from PyTorch's by a max relative error of 0\.001"):
        export_clip(model, tokenizer_for(model.config.text), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_damaged_or_foreign_directory_is_refused_by_name(exported, tmp_path):
    from siclip.interop import load_clip

    _, _, done = exported
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}: not an exported model directory"):
        load_clip(tmp_path)
    copy_dir = tmp_path / "copy"
    shutil.copytree(done.directory, copy_dir)
    manifest = json.loads((copy_dir / MANIFEST).read_text())
    with open(copy_dir / "text.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ValueError, match="text.onnx is not the file exported with this manifest"):
        load_clip(copy_dir)
    for change, message in (({"format": "other"}, "format 'other'"), ({"embed_dim": "128"}, "'embed_dim' must be an integer"),
                            ({"precision": "int4"}, "'precision' must be 'float32' or 'int8', got 'int4'"),
                            ({"image": {"file": "image.onnx"}}, "field 'image.input' is missing"),
                            ({"image": {**manifest["image"], "file": "../image.onnx"}}, "field 'image.file' must be 'image.onnx'"),
                            ({"preprocess": {"size": 64, "resize_mode": "zoom"}}, "'preprocess' is not a preprocessing \\(resize_mode")):  # fmt: skip
        (copy_dir / MANIFEST).write_text(json.dumps({**manifest, **change}))
        with pytest.raises(ValueError, match=message):
            read_manifest(copy_dir, check_files=False)
    (copy_dir / MANIFEST).write_text("{not json")
    with pytest.raises(ValueError, match="not a readable JSON manifest"):
        load_clip(copy_dir)


def test_an_export_replaces_an_earlier_export_but_never_other_files(tmp_path):
    from siclip.deploy.export import written_by_export
    from siclip.storage import OutputRefused, check_output, replace_directory

    def directory(name: str, *files: str) -> Path:
        path = tmp_path / name
        path.mkdir()
        for file in files:
            (path / file).write_text(name if file != MANIFEST else json.dumps({"tokenizer": {"name": "embedded"}}))
        return path

    out = directory("out", MANIFEST, "image.onnx", "text.onnx")  # an earlier export
    assert check_output(out, ours=written_by_export) == out
    replace_directory(directory("built", MANIFEST, "image.onnx"), out)
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST, "image.onnx"]) and (out / "image.onnx").read_text() == "built"
    check_output(directory("empty"), ours=written_by_export)  # an empty directory is taken
    (out / "NOTES.md").write_text("mine")  # an earlier export with the user's notes beside it
    for notes in (out, directory("notes", "keep.txt")):
        with pytest.raises(OutputRefused, match=f"--out {notes} holds files it did not write .*--overwrite"):
            check_output(notes, ours=written_by_export)
    assert (out / "NOTES.md").read_text() == "mine" and (tmp_path / "notes" / "keep.txt").read_text() == "notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "notes", "out"]  # nothing else left behind


def test_export_script_reports_bad_input_in_one_line(tmp_path):
    from siclip.models import save_checkpoint

    save_checkpoint(create_model("siclip_tiny"), tmp_path / "model.pt")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    for model, out, message in ((tmp_path / "missing.pt", tmp_path / "out", "model file not found"),
                                (tmp_path / "model.pt", tmp_path / "notes", f"--out {tmp_path / 'notes'} holds files it did not write (keep.txt)")):  # fmt: skip
        done = subprocess.run([sys.executable, str(ROOT / "experiments/export.py"), "--model", str(model), "--out", str(out)],
                              capture_output=True, text=True, timeout=300, cwd=tmp_path)  # fmt: skip
        last = done.stderr.strip().splitlines()[-1]
        assert done.returncode == 2 and last.startswith("export.py: error: ") and message in last and "Traceback" not in done.stderr, done.stderr
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"


# ── the command line on real scans: export, evaluate the export, int8 ───────────────────────────────────────────


def run_script(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    # One thread: a tiny model gains little from two, and two spin-waiting threads on a shared 2-core machine can take
    # minutes for seconds of work.
    done = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, capture_output=True, text=True, timeout=900,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert done.returncode == 0, f"{script} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.mark.slow
def test_exported_model_evaluates_as_its_checkpoint_on_real_scans(tmp_path):
    """scikit-learn's handwritten digits, a model trained on them from the command line (briefly: the metrics need
    not be high, only the same), exported with int8: evaluate.py gives the checkpoint's metrics for the export."""
    pytest.importorskip("sklearn")
    from test_cli_real_images import write_digits

    files = write_digits(tmp_path / "data", held_out_per_class=10)
    run = tmp_path / "run"
    run_script("experiments/train.py", "--model", "siclip_tiny", "--data", str(files["csv"]), "--synthetic-keys", "syn0,syn1",
               "--tokenizer", "words", "--image-size", "32", "--epochs", "1", "--batch-size", "64", "--lr", "1e-3", "--no-eval",
               "--mask-padding", "--out", str(run), cwd=tmp_path)  # fmt: skip
    done = run_script("experiments/export.py", "--model", str(run / "model.pt"), "--out", str(run / "onnx"), "--quantize", "int8", cwd=tmp_path)
    assert "int8/image.onnx" in done.stdout and "max relative error against PyTorch" in done.stdout
    metrics = {}
    for name, model in (("checkpoint", run / "model.pt"), ("onnx", f"{run / 'onnx'}/"), ("int8", run / "onnx" / "int8")):
        run_script("experiments/evaluate.py", "--model", str(model), "--zeroshot", str(files["test"]), "--classnames",
                   str(files["classnames"]), "--templates", str(files["templates"]), "--out", str(tmp_path / name), cwd=tmp_path)  # fmt: skip
        record = json.loads((tmp_path / name / "test_zeroshot_classification.json").read_text())
        metrics[name] = record["metrics"]
        assert record["model"] == {"checkpoint": "siclip_tiny", "onnx": "siclip_tiny (ONNX)", "int8": "siclip_tiny (ONNX int8)"}[name]
    assert metrics["onnx"] == metrics["checkpoint"]  # every image's class, so every figure
    assert metrics["int8"]["images"] == 100 and metrics["int8"]["classes"] == 10
    assert abs(metrics["int8"]["acc1"] - metrics["checkpoint"]["acc1"]) <= 0.1  # quantised, not broken (a quantised stem: chance)
    print({name: (m["acc1"], m["acc5"]) for name, m in metrics.items()})
    # The quick path's third command: the export's images/s and texts/s against eager PyTorch of its checkpoint.
    done = run_script("benchmarks/cpu_inference.py", "--runtime", "onnx", "--exported", str(run / "onnx"), "--smoke", "--batch", "1", "2", cwd=tmp_path)
    rows = [line for line in done.stdout.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert f"eager PyTorch: {run / 'model.pt'}" in done.stdout and len(rows) == 4 and all(row.count("×") == 1 for row in rows), done.stdout


@pytest.mark.slow
def test_onnx_benchmark_runs_at_tiny_size(tmp_path):
    """``benchmarks/cpu_inference.py --runtime onnx --smoke``: every part of both tiny models exported and timed under
    both runtimes, the table with its bounds, and the subnormal count (a check of the script: 3 rounds measure nothing)."""
    done = run_script("benchmarks/cpu_inference.py", "--runtime", "onnx", "--smoke", "--batch", "1", "--onnx-dir", str(tmp_path / "onnx"), cwd=tmp_path)
    assert "subnormal float32 values under ONNX Runtime" in done.stdout and "mobileclip_tiny image: weights 0 of" in done.stdout
    table = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| part |") and [row.split(" | ")[0] for row in table[1:]] == ["| image", "| image stage 4", "| text", "| text blocks"]
    assert "ORT " in table[1] and "eager " in table[1] and "≥ 1.03×" in table[1] and "≥ 1.1×" in table[3], done.stdout
    assert len(list((tmp_path / "onnx").glob("*.onnx"))) == 8
