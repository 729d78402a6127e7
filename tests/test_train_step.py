"""The memory design of the training step (issue 7): frozen prefixes keep no graph, activation
checkpointing changes no gradient, frozen BatchNorm keeps its statistics, FLOPs per step, the step
benchmark on tiny models."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from siclip.analysis.train_step import (
    VARIANTS, StepConfig, build_step_task, last_stage_prefixes, measure_step, plot_step_scaling, step_flops, synthetic_batch,
)  # fmt: skip
from siclip.distill import FrozenTeacher
from siclip.models import SiCLIPConfig, build_siclip, create_model, fuse_frozen_towers
from siclip.models.stages import run_stages

ROOT = Path(__file__).resolve().parents[1]
TINY = {"teacher": "mobileclip_tiny", "student": "siclip_tiny"}


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd saves for backward while ``fn()`` runs (storages counted once)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def grad_modes(model: nn.Module, fn) -> dict[str, bool]:
    """For each named module, whether autograd was recording while its forward ran."""
    seen: dict[str, bool] = {}

    def record(name: str):
        def hook(module, inputs, output) -> None:
            seen.setdefault(name, torch.is_grad_enabled())

        return hook

    hooks = [m.register_forward_hook(record(name)) for name, m in model.named_modules() if name]
    try:
        fn()
    finally:
        for h in hooks:
            h.remove()
    return seen


def perturb_batchnorm_(model: nn.Module, seed: int) -> nn.Module:
    """Running statistics away from (0, 1), so that eval and train mode really differ."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


def test_inherited_student_runs_its_frozen_prefix_without_a_graph(seed):
    student, _ = build_siclip(create_model("mobileclip_tiny"), SiCLIPConfig())
    student.train()
    images, ids = torch.randn(4, 3, 64, 64), torch.randint(1, 255, (4, 32))
    ids[:, -1] = 255
    modes = grad_modes(student, lambda: student(images, ids))
    image_prefix = ("visual.patch_embed", *(f"visual.network.{i}." for i in range(7)))
    frozen = [n for n in modes if n.startswith((*image_prefix, "text.mixer_in"))]
    assert frozen and not any(modes[n] for n in frozen)  # the image tower before its SAS-P stage and the text prefix
    assert all(modes[n] for n in modes if n.startswith("text.transformer.") and n.count(".") == 2)
    assert all(modes[n] for n in ("visual.network.7.0", "visual.network.7.1", "text.mixer_out", "text.final_norm"))
    assert all(modes[n] for n in ("visual.conv_exp", "visual.head"))  # gradients flow back through them
    out = student(images, ids)
    assert out.image_features.grad_fn is not None and out.text_features.grad_fn is not None
    text_only, _ = build_siclip(create_model("mobileclip_tiny"), SiCLIPConfig(convert=("text",)))
    assert text_only.train()(images, ids).image_features.grad_fn is None  # an all-frozen image tower keeps no graph


def test_frozen_prefix_saves_exactly_what_the_trainable_suffix_saves(seed):
    model = create_model("mobileclip_tiny").train()
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(last_stage_prefixes(model)))
    stages = model.visual.stages()
    first = next(i for i, s in enumerate(stages) if any(p.requires_grad for p in s.parameters()))
    assert 0 < first < len(stages) - 1
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        prefix_out = run_stages(stages[:first], x)
    whole = saved_bytes(lambda: model.visual(x))
    suffix = saved_bytes(lambda: run_stages(stages[first:], prefix_out))
    assert whole == suffix > 0
    everything = saved_bytes(lambda: model.visual(x.requires_grad_(True)))
    assert everything > 2 * whole  # the prefix (high-resolution stages) is most of the activations


@pytest.mark.parametrize("tower", ["image", "text"])
def test_activation_checkpointing_keeps_gradients_and_saves_memory(seed, tower):
    torch.manual_seed(seed)
    model = create_model("siclip_tiny").double().train()
    images, ids = torch.randn(4, 3, 64, 64, dtype=torch.float64), torch.randint(1, 255, (4, 32))
    ids[:, -1] = 255

    def loss() -> torch.Tensor:
        out = model(images, ids)
        return (out.image_features @ out.text_features.T * out.logit_scale).logsumexp(-1).sum()

    def gradients() -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        state = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
        loss().backward()
        model.load_state_dict(state, strict=False)  # the same BatchNorm statistics for both runs
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = gradients()
    plain_bytes = saved_bytes(loss)
    model.set_grad_checkpointing(True, towers=(tower,))
    checkpointed = gradients()
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-10, atol=1e-12, msg=name)
    assert saved_bytes(loss) < 0.8 * plain_bytes


def test_frozen_batchnorm_keeps_inherited_statistics(seed):
    teacher = perturb_batchnorm_(create_model("mobileclip_tiny"), seed)
    student, _ = build_siclip(teacher, SiCLIPConfig())
    before = {k: v.clone() for k, v in student.state_dict().items() if "running" in k}
    student.train()
    assert student.text.transformer[0].training and not student.visual.patch_embed[0].rbr_conv[0].bn.training
    student(torch.randn(4, 3, 64, 64), torch.randint(1, 256, (4, 32)))
    trained = "visual.network.7."  # the image SAS-P blocks train, and their BatchNorm with them
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items() if "running" in k and not k.startswith(trained))
    assert not torch.equal(before[trained + "0.norm.running_mean"], student.state_dict()[trained + "0.norm.running_mean"])
    trainable = create_model("mobileclip_tiny").train()
    assert trainable.visual.patch_embed[0].rbr_conv[0].bn.training  # only frozen BatchNorm stays in eval


def test_fused_frozen_towers_compute_the_same_features(seed):
    teacher = perturb_batchnorm_(create_model("mobileclip_tiny"), seed).eval()
    student, _ = build_siclip(teacher, SiCLIPConfig(convert=("text",)))  # the text-only ablation: an all-frozen image tower
    assert fuse_frozen_towers(build_siclip(teacher, SiCLIPConfig())[0]) == []  # the default trains image blocks
    images = torch.randn(3, 3, 64, 64)
    reference = student.eval().encode_image(images)
    assert fuse_frozen_towers(student) == ["visual"]
    assert not any(p.requires_grad for p in student.visual.parameters())
    assert any("reparam" in k for k in student.visual.state_dict())
    torch.testing.assert_close(student.encode_image(images), reference, rtol=1e-4, atol=1e-5)

    fused_teacher = FrozenTeacher(create_model("mobileclip_tiny"), reparameterize=True)
    assert not any(p.requires_grad for p in fused_teacher.parameters())


def test_step_flops_count_frozen_prefix_once_and_trainable_layers_thrice(seed):
    d, n = 16, 8
    layers = [nn.Linear(d, d, bias=False) for _ in range(3)]
    layers[0].requires_grad_(False)
    x = torch.randn(n, d)
    one = 2 * n * d * d  # FLOPs of one layer's forward

    def step() -> None:
        run_stages(layers, x).sum().backward()

    # Layer 0: forward only. Layer 1: forward + weight gradient (its input needs none). Layer 2: all three.
    assert step_flops(step) == one * (1 + 2 + 3)
    # Only layer 0 trainable: its forward and weight gradient, then forward + input gradient downstream.
    for layer in layers[1:]:
        layer.requires_grad_(False)
    layers[0].requires_grad_(True)
    assert step_flops(step) == one * (2 + 2 + 2)


@pytest.mark.parametrize("variant", VARIANTS)
def test_step_benchmark_runs_each_variant(seed, variant):
    row = measure_step(StepConfig(variant, batch=6, **TINY), "cpu", steps=1, warmup=1)
    assert not row["oom"] and row["ms"] > 0 and row["tflops_per_step"] > 0
    model = create_model("mobileclip_tiny")
    if variant == "image_last_stage":
        expected = sum(p.numel() for n, p in model.named_parameters() if n.startswith(last_stage_prefixes(model)))
        assert row["trainable_params"] == expected


def test_full_step_costs_more_flops_than_cached_step(seed):
    rows = {v: measure_step(StepConfig(v, batch=4, **TINY), "cpu", steps=1, warmup=0) for v in ("siclip", "siclip_cached")}
    assert rows["siclip"]["tflops_per_step"] > rows["siclip_cached"]["tflops_per_step"]


def test_step_config_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown step variant"):
        StepConfig("teacher_only")
    with pytest.raises(ValueError, match="at least 2"):
        StepConfig("siclip", batch=1)


def test_scaling_plot_is_written(tmp_path):
    rows = [{"variant": "siclip_cached", "batch": b, "peak_gib": b / 100, "images_per_s": 10 * b, "oom": False} for b in (8, 16)]
    rows.append({"variant": "all_trainable", "batch": 32, "oom": True})
    path = plot_step_scaling(rows, tmp_path / "plot.png")
    assert path.stat().st_size > 1000


@pytest.mark.slow
def test_gpu_train_step_script_smoke(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks/gpu_train_step.py"), "--smoke", "--device", "cpu", "--out", str(tmp_path),
           "--skip", "ladder", "trainable"]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "cached step" in (tmp_path / "train_step.md").read_text()
    assert (tmp_path / "train_step.png").exists() and (tmp_path / "profile.txt").exists()


@pytest.mark.gpu
def test_cuda_step_matches_cpu_step_in_float32(seed):
    from siclip.train.step import forward_terms, to_device

    config = StepConfig("siclip_cached", batch=6, bf16=False, **TINY)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(seed)
    task = build_step_task(config).train()
    batch = synthetic_batch(config, task.student.config, seed=seed)
    cpu = forward_terms(task, batch, bf16=False)
    gpu_task = task.cuda().to(memory_format=torch.channels_last)
    gpu = forward_terms(gpu_task, to_device(batch, torch.device("cuda"), channels_last=True), bf16=False)
    for name in cpu:
        torch.testing.assert_close(gpu[name].cpu(), cpu[name], rtol=1e-4, atol=1e-5, msg=name)


def test_fused_towers_survive_a_checkpoint_round_trip(tmp_path, seed):
    from siclip.models import load_checkpoint, save_checkpoint

    student, _ = build_siclip(perturb_batchnorm_(create_model("mobileclip_tiny"), seed), SiCLIPConfig(convert=("text",)))  # an all-frozen image tower
    fuse_frozen_towers(student)
    loaded = load_checkpoint(save_checkpoint(student, tmp_path / "model.pt"))
    assert loaded.fused_towers == ["visual"] and not any(p.requires_grad for p in loaded.visual.parameters())
    images, ids = torch.randn(2, 3, 64, 64), torch.randint(1, 256, (2, 32))
    torch.testing.assert_close(loaded.eval()(images, ids), student.eval()(images, ids))


def test_task_runs_the_teacher_before_the_student(seed):
    """The teacher's transient activations must not coexist with the student's stored ones."""
    config = StepConfig("siclip", 4, **TINY)
    task = build_step_task(config).train()
    order: list[str] = []
    task.teacher.register_forward_pre_hook(lambda module, args: order.append("teacher"))
    task.student.register_forward_pre_hook(lambda module, args: order.append("student"))
    task(synthetic_batch(config, task.student.config))
    assert order == ["teacher", "student"]


def test_full_step_peaks_no_higher_than_the_cached_step(seed):
    """Teacher first: its forward's transients are gone before the student stores anything, so the
    full step's high-water mark is the cached step's (measured from the profiler's allocation events)."""
    from siclip.analysis.train_step import prepare_step, transient_peak_bytes

    peaks = {}
    for variant in ("siclip", "siclip_cached"):
        step, _, _ = prepare_step(StepConfig(variant, 32, **TINY), "cpu")
        step()  # optimiser state allocated before measuring
        peaks[variant] = transient_peak_bytes(step)
    assert peaks["siclip_cached"] > 0
    assert peaks["siclip"] <= 1.01 * peaks["siclip_cached"]
