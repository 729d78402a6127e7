"""Jensen–Shannon divergence between the blocks of an encoder, the measure SiCLIP shares weights by.

    JS(P ‖ Q) = ½·KL(P ‖ M) + ½·KL(Q ‖ M),   M = ½(P + Q)      (natural log: 0 ≤ JS ≤ ln 2)

Two readings (``paper_math.md`` §6 #2), both computed:

- **attention**: for blocks l and m on one calibration batch, the mean over samples, heads and queries
  of JS between their attention rows ``softmax(q kᵀ/√d)`` over keys (Xiao et al. 2019); per head too.
- **features**: JS between the blocks' outputs read as distributions over channels (softmax over the
  width of each token), averaged over tokens.

Blocks are recorded *per call* through forward hooks that keep the call's arguments, so a stack whose blocks share
weights (the same module at several positions) is measured position by position, and each block's attention is read
by its type's reader (:func:`siclip.blocks.read_attention`) under the masks it was called with: siclip's blocks,
and the original blocks of transformers, timm and open_clip models (:func:`divergence_report` takes any model). Text
blocks attend over token positions, the image encoder's attention blocks over the h·w positions of their feature
map (8×8 in MCi0 at 256 px).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from einops import rearrange
from torch import Tensor, nn

from siclip.blocks import SharingPlan, plan_sharing, read_attention
from siclip.blocks.readers import ATTENTION_READERS, has_attention_reader
from siclip.blocks.sharing import adjacent_divergences

from .figures import pyplot, save_figure


def js_divergence(p: Tensor, q: Tensor, dim: int = -1) -> Tensor:
    """Exact JS divergence (nats) between distributions along ``dim``; 0·log 0 = 0."""
    m = (p + q) / 2
    kl_pm = torch.xlogy(p, p).sum(dim) - torch.xlogy(p, m).sum(dim)
    kl_qm = torch.xlogy(q, q).sum(dim) - torch.xlogy(q, m).sum(dim)
    return (kl_pm + kl_qm) / 2


@torch.no_grad()
def attention_probabilities(block: nn.Module, x: Tensor, key_padding_mask: Tensor | None = None, causal: bool | None = None) -> Tensor:
    """``(batch, heads, tokens, tokens)`` softmax attention a siclip block computes on its input ``x``, called with
    ``key_padding_mask`` (True = hidden) and ``causal`` (None: the block's default): hidden keys get probability 0.
    Any other block: :func:`siclip.blocks.read_attention` with the call's own arguments."""
    kwargs = {k: v for k, v in (("key_padding_mask", key_padding_mask), ("causal", causal)) if v is not None}
    return read_attention(block, (x,), kwargs)


Call = tuple[nn.Module, tuple, dict, object]


@torch.no_grad()
def record_blocks(blocks, run) -> list[Call]:
    """``(block, args, kwargs, output)`` for every call of a block of ``blocks`` while ``run()`` executes, in order:
    the call as the host model made it, masks included, so a reader can interpret it as the block did."""
    calls: list[Call] = []

    def record(module, args, kwargs, out):
        calls.append((module, args, dict(kwargs), out))

    handles = [m.register_forward_hook(record, with_kwargs=True) for m in {id(b): b for b in blocks}.values()]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _token_features(output) -> Tensor:
    """A block's output as ``(batch, tokens, channels)`` (a map's positions as tokens; a tuple's first element)."""
    y = output[0] if isinstance(output, (tuple, list)) else output
    return y if y.dim() == 3 else rearrange(y, "b c h w -> b (h w) c")


@torch.no_grad()
def block_divergences(blocks, run) -> dict[str, Tensor]:
    """Pairwise JS matrices over the block calls made by ``run()``.

    Returns ``attention`` (n, n), ``attention_per_head`` (n, n, heads) and ``features`` (n, n).
    """
    calls = record_blocks(blocks, run)
    if len(calls) < 2:
        raise ValueError("need at least two block calls to compare")
    probs = [read_attention(block, args, kwargs).double() for block, args, kwargs, _ in calls]
    feats = [torch.softmax(_token_features(y).double(), dim=-1) for _, _, _, y in calls]
    n, heads = len(calls), probs[0].shape[1]
    per_head = torch.zeros(n, n, heads, dtype=torch.float64)
    features = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(i + 1, n):
            per_head[i, j] = per_head[j, i] = js_divergence(probs[i], probs[j]).mean(dim=(0, 2))
            features[i, j] = features[j, i] = js_divergence(feats[i], feats[j]).mean()
    return {"attention": per_head.mean(-1), "attention_per_head": per_head, "features": features}


def attention_block_groups(model: nn.Module) -> dict[str, list[tuple[str, nn.Module]]]:
    """The blocks of ``model`` whose attention can be read (:func:`siclip.blocks.read_attention`), outermost only,
    grouped by the container holding them (``text_model.encoder.layers``, ``visual.transformer.resblocks``…): one
    group per tower or stack, blocks in order."""
    groups: dict[str, list[tuple[str, nn.Module]]] = {}
    taken: list[str] = []
    for name, module in model.named_modules(remove_duplicate=False):  # a block shared by two positions is at both
        if not name or any(name.startswith(t + ".") for t in taken) or not has_attention_reader(module):
            continue
        taken.append(name)
        parent = name.rpartition(".")[0]
        groups.setdefault(parent, []).append((name, module))
    return groups


@dataclass
class DivergenceReport:
    """Divergences between the adjacent and all blocks of each stack of a model, and the sharing plans they give.

    ``groups[stack]`` holds ``blocks`` (names), ``attention`` and ``features`` (n × n JS matrices, nats),
    ``plans`` (strategy → :class:`~siclip.blocks.SharingPlan`) and ``plan`` (the optimal partition into
    ``max_groups`` runs of adjacent blocks, by attention JS)."""

    model: str
    groups: dict[str, dict] = field(default_factory=dict)

    def table(self):
        """One row per adjacent pair: ``stack, pair, blocks, attention, features`` (a pandas table, nats)."""
        import pandas as pd

        rows = []
        for stack, g in self.groups.items():
            for i in range(len(g["blocks"]) - 1):
                rows.append({"stack": stack, "pair": f"{i}-{i + 1}", "blocks": f"{g['blocks'][i]} / {g['blocks'][i + 1]}",
                             "attention": float(g["attention"][i, i + 1]), "features": float(g["features"][i, i + 1])})  # fmt: skip
        return pd.DataFrame(rows, columns=["stack", "pair", "blocks", "attention", "features"])

    def __str__(self) -> str:
        lines = [f"{self.model}: Jensen–Shannon divergence between adjacent blocks (nats; 0 = identical, ln 2 = disjoint)", "",
                 "| stack | pair | attention | features |", "|---|---|---:|---:|"]  # fmt: skip
        for _, r in self.table().iterrows():
            lines.append(f"| {r['stack']} | {r['pair']} | {r['attention']:.4f} | {r['features']:.4f} |")
        lines += ["", "| stack | optimal plan |", "|---|---|"] + [f"| {s} | {g['plan']} |" for s, g in self.groups.items()]
        return "\n".join(lines)

    def save(self, out_dir: str | Path) -> list[Path]:
        """Heatmaps (``divergence_<stack>_<reading>.png``) and ``divergence.json`` (matrices, plans) in ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths, record = [], {"model": self.model, "stacks": {}}
        for stack, g in self.groups.items():
            slug = stack.replace(".", "_") or "model"
            labels = [name.rsplit(".", 1)[-1] if name.rsplit(".", 1)[-1].isdigit() else name for name in g["blocks"]]
            labels = [f"block {label}" if label.isdigit() else label for label in labels]
            for reading in ("attention", "features"):
                title = f"{self.model}: {stack} ({reading})"
                paths.append(plot_heatmap(g[reading], out / f"divergence_{slug}_{reading}.png", title, labels))
            record["stacks"][stack] = {"blocks": g["blocks"], "attention": g["attention"].tolist(), "features": g["features"].tolist(),
                                       "plans": {k: str(v) for k, v in g["plans"].items()}, "optimal": str(g["plan"])}  # fmt: skip
        path = out / "divergence.json"
        path.write_text(json.dumps(record, indent=1))
        return [*paths, path]


def _runner(model: nn.Module, inputs):
    if callable(inputs) and not isinstance(inputs, (Tensor, nn.Module)):
        return inputs
    if isinstance(inputs, dict):
        return lambda: model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return lambda: model(*inputs)
    return lambda: model(inputs)


@torch.no_grad()
def divergence_report(model: nn.Module, inputs, *, max_groups: int | dict | None = None, name: str | None = None) -> DivergenceReport:
    """JS divergences between the blocks of every stack of ``model`` on ``inputs`` (what ``model`` is called with: a
    dict of keyword arguments, a tuple of positional ones, one tensor, or a function that runs it), each stack's
    adjacent-pair table, its heatmaps (:meth:`DivergenceReport.save`) and its sharing plans: the optimal partition into
    ``max_groups`` runs (default half the blocks; a dict gives it per stack). Works on any model whose blocks have an
    attention reader: siclip's, and the original blocks of transformers, timm and open_clip models, read under the
    causal and padding masks the model itself applies."""
    groups = attention_block_groups(model)
    if not groups:
        raise ValueError(f"no block of {type(model).__name__} has an attention reader; readers exist for {', '.join(ATTENTION_READERS.known())}")
    was_training = model.training
    model.eval()
    run = _runner(model, inputs)
    report = DivergenceReport(name or type(model).__name__)
    try:
        for stack, blocks in groups.items():
            if len(blocks) < 2:
                continue
            d = block_divergences([b for _, b in blocks], run)
            n = d["attention"].shape[0]
            if n != len(blocks):
                raise ValueError(f"{stack}: {len(blocks)} blocks made {n} calls on these inputs; a block called twice cannot be placed")
            wanted = max_groups.get(stack) if isinstance(max_groups, dict) else max_groups
            plans = sharing_plans(d["attention"], max_groups=wanted)
            optimal = next(plan for key, plan in plans.items() if key.startswith("optimal"))
            report.groups[stack] = {"blocks": [n for n, _ in blocks], **d, "plans": plans, "plan": optimal}
    finally:
        model.train(was_training)
    if not report.groups:
        raise ValueError(f"every stack of {type(model).__name__} has a single block: there is nothing to compare")
    return report


def text_divergences(model, ids: Tensor) -> dict[str, Tensor]:
    """Divergences between the text transformer blocks of a CLIP model on a batch of token ids."""
    return block_divergences(model.text.transformer, lambda: model.text(ids))


def calibration_images(source, count: int, preprocess) -> Tensor:
    """The first ``count`` images of a data source in a model's evaluation view (``preprocess``, the model's own:
    resize, centre crop, its mean and std): ``(count, 3, S, S)``."""
    from siclip.data import decode_image, preprocess_image

    samples = (source.load(i) for i in range(min(count, len(source))))
    return torch.stack([preprocess_image(decode_image(s.image, s.key), preprocess) for s in samples])


def image_divergences(model, images: Tensor) -> dict[str, Tensor]:
    """Divergences between the image encoder's attention blocks (MCi or converted SAS-P) on a batch of images."""
    from siclip.models.siclip import attention_stage

    _, blocks = attention_stage(model, converted=True)
    return block_divergences(blocks, lambda: model.visual(images))


def adjacent_trajectory(snapshots: dict[int, nn.Module], ids: Tensor, images: Tensor) -> list[dict]:
    """JS divergence between adjacent block calls of each tower at each training step.

    ``snapshots`` maps a step to the model as it was then. Rows: ``step, tower, pair ("0-1"), attention,
    features`` (nats); a tower with fewer than two attention blocks has no row.
    """
    from siclip.models.siclip import attention_stage

    rows = []
    for step, model in sorted(snapshots.items()):
        model.eval()
        towers = {"text": (model.text.transformer, lambda m=model: m.text(ids)),
                  "image": (attention_stage(model, converted=True)[1], lambda m=model: m.visual(images))}  # fmt: skip
        for tower, (blocks, run) in towers.items():
            if len(blocks) < 2:
                continue
            d = block_divergences(blocks, run)
            for i in range(d["attention"].shape[0] - 1):
                rows.append({"step": step, "tower": tower, "pair": f"{i}-{i + 1}",
                             "attention": float(d["attention"][i, i + 1]), "features": float(d["features"][i, i + 1])})  # fmt: skip
    return rows


def plot_trajectory(rows: list[dict], path: str | Path, title: str) -> Path:
    """Adjacent-block JS divergence against training step: one panel per tower and reading, one line per pair."""
    plt = pyplot()
    import pandas as pd

    frame = pd.DataFrame(rows)
    towers = list(dict.fromkeys(frame["tower"]))
    fig, axes = plt.subplots(len(towers), 2, figsize=(10, 3.2 * len(towers)), squeeze=False)
    for r, tower in enumerate(towers):
        part = frame[frame.tower == tower]
        for c, reading in enumerate(("attention", "features")):
            ax = axes[r][c]
            for pair, line in part.groupby("pair", sort=False):
                ax.plot(line["step"], line[reading], marker="o", label=f"blocks {pair}")
            ax.set_title(f"{tower} tower, {reading}")
            ax.set_xlabel("training step")
            ax.set_ylabel("JS divergence (nats)")
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def sharing_plans(divergence: Tensor, *, max_groups: int | None = None) -> dict[str, SharingPlan]:
    """The plan each strategy picks: none, adjacent pairs, threshold at the median adjacent divergence,
    and the optimal partition into ``max_groups`` (default half the blocks) runs."""
    n = divergence.shape[0]
    matrix = divergence.detach().cpu().numpy()
    threshold = float(sorted(adjacent_divergences(matrix))[(n - 2) // 2])
    return {
        "none": plan_sharing("none", n),
        "adjacent": plan_sharing("adjacent", n),
        f"threshold (≤ {threshold:.3g})": plan_sharing("threshold", n, matrix, threshold=threshold),
        f"optimal ({max_groups or max(1, n // 2)} groups)": plan_sharing("optimal", n, matrix, max_groups=max_groups or max(1, n // 2)),
    }


def plot_heatmap(matrix: Tensor, path: str | Path, title: str, labels: list[str] | None = None) -> Path:
    """A labelled heatmap PNG of a divergence matrix."""
    plt = pyplot()
    values = matrix.detach().cpu().numpy()
    n = values.shape[0]
    labels = labels or [f"block {i}" for i in range(n)]
    fig, ax = plt.subplots(figsize=(1.2 * n + 2, 1.1 * n + 1.5))
    image = ax.imshow(values, cmap="viridis")
    ax.set_xticks(range(n), labels, rotation=45, ha="right")
    ax.set_yticks(range(n), labels)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{values[i, j]:.3g}", ha="center", va="center", color="white" if values[i, j] < values.max() / 2 else "black", fontsize=8)
    fig.colorbar(image, ax=ax, label="Jensen–Shannon divergence (nats)")
    ax.set_title(title)
    fig.tight_layout()
    return save_figure(fig, path)


def calibrated_divergence(spec: str, caption_file: str | None, image_folder: str | None, captions: int, images: int,
                          max_groups: int | None):  # fmt: skip
    """``(model, run, report)``: the original ``spec`` names, its :func:`~siclip.interop.converted.calibration_run` on the first
    ``captions`` lines of ``caption_file`` and ``images`` images of ``image_folder``, and the divergence between the blocks
    of each of its stacks."""
    from siclip.data.sources import read_image_folder
    from siclip.interop.converted import calibration_run, load_original
    from siclip.train.evaluation import read_caption_file

    model = load_original(spec)
    texts = read_caption_file(caption_file)[:captions] if caption_file else None
    pictures = read_image_folder(image_folder, images) if image_folder else None
    run = calibration_run(spec, model, texts, pictures)
    return model, run, divergence_report(model, lambda: run(model), max_groups=max_groups, name=spec)
