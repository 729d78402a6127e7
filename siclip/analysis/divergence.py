"""Jensen–Shannon divergence between the blocks of an encoder, the measure SiCLIP shares weights by.

    JS(P ‖ Q) = ½·KL(P ‖ M) + ½·KL(Q ‖ M),   M = ½(P + Q)      (natural log: 0 ≤ JS ≤ ln 2)

Two readings (``paper_math.md`` §6 #2), both computed:

- **attention**: for blocks l and m on one calibration batch, the mean over samples, heads and queries
  of JS between their attention rows ``softmax(q kᵀ/√d)`` over keys (Xiao et al. 2019); per head too.
- **features**: JS between the blocks' outputs read as distributions over channels (softmax over the
  width of each token), averaged over tokens.

Blocks are recorded *per call* through forward pre-hooks, so a stack whose blocks share weights (the
same module at several positions) is measured position by position. Text blocks attend over token
positions, the image encoder's attention blocks over the h·w positions of their feature map (8×8 in MCi0
at 256 px).
"""

from __future__ import annotations

from pathlib import Path

import torch
from einops import rearrange
from torch import Tensor, nn

from siclip.blocks import PreLNBlock, SASBlock, SASPBlock, SASPBlock2d, SharingPlan, plan_sharing
from siclip.blocks.sharing import adjacent_divergences

from .figures import pyplot, save_figure


def js_divergence(p: Tensor, q: Tensor, dim: int = -1) -> Tensor:
    """Exact JS divergence (nats) between distributions along ``dim``; 0·log 0 = 0."""
    m = (p + q) / 2
    kl_pm = torch.xlogy(p, p).sum(dim) - torch.xlogy(p, m).sum(dim)
    kl_qm = torch.xlogy(q, q).sum(dim) - torch.xlogy(q, m).sum(dim)
    return (kl_pm + kl_qm) / 2


def _split(x: Tensor, heads: int) -> Tensor:
    return rearrange(x, "b t (h d) -> b h t d", h=heads)


@torch.no_grad()
def attention_probabilities(block: nn.Module, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
    """``(batch, heads, tokens, tokens)`` softmax attention a block computes on its input ``x``.

    ``key_padding_mask`` (True = hidden, as the block was called with it) gives hidden keys probability 0."""
    from siclip.models.fastvit import AttentionBlock

    if isinstance(block, SASPBlock):
        h = block.norm(x)
        q, k, attn = block.attn.q(h), block.attn.k(h), block.attn
    elif isinstance(block, SASBlock):
        h = block.norm1(x)
        q, k, attn = block.attn.q(h), block.attn.k(h), block.attn
    elif isinstance(block, PreLNBlock):
        q, k, _ = block.attn.qkv(block.norm1(x)).chunk(3, dim=-1)
        attn = block.attn
    elif isinstance(block, SASPBlock2d):
        h = block.normed_tokens(x)
        q, k, attn = block.attn.q(h), block.attn.k(h), block.attn
    elif isinstance(block, AttentionBlock):
        tokens = rearrange(block.norm(x), "b c h w -> b (h w) c")
        q, k, _ = block.token_mixer.qkv(tokens).chunk(3, dim=-1)
        attn = block.token_mixer
    else:
        raise TypeError(f"cannot read attention from a {type(block).__name__}")
    q, k = _split(q, attn.num_heads), _split(k, attn.num_heads)
    logits = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    if key_padding_mask is not None:
        logits = logits.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    return torch.softmax(logits, dim=-1)


@torch.no_grad()
def record_blocks(blocks: nn.ModuleList | nn.Sequential, run) -> list[tuple[nn.Module, Tensor, Tensor, Tensor | None]]:
    """``(block, input, output, key_padding_mask)`` for every call of a block of ``blocks`` while ``run()`` executes, in order."""
    calls: list[tuple[nn.Module, Tensor, Tensor, Tensor | None]] = []

    def record(module, args, kwargs, out):
        calls.append((module, args[0], out, kwargs.get("key_padding_mask")))

    handles = [m.register_forward_hook(record, with_kwargs=True) for m in {id(b): b for b in blocks}.values()]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return calls


@torch.no_grad()
def block_divergences(blocks: nn.ModuleList | nn.Sequential, run) -> dict[str, Tensor]:
    """Pairwise JS matrices over the block calls made by ``run()``.

    Returns ``attention`` (n, n), ``attention_per_head`` (n, n, heads) and ``features`` (n, n).
    """
    calls = record_blocks(blocks, run)
    if len(calls) < 2:
        raise ValueError("need at least two block calls to compare")
    probs = [attention_probabilities(block, x, mask).double() for block, x, _, mask in calls]
    feats = [torch.softmax((y if y.dim() == 3 else rearrange(y, "b c h w -> b (h w) c")).double(), dim=-1) for _, _, y, _ in calls]
    n, heads = len(calls), probs[0].shape[1]
    per_head = torch.zeros(n, n, heads, dtype=torch.float64)
    features = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(i + 1, n):
            per_head[i, j] = per_head[j, i] = js_divergence(probs[i], probs[j]).mean(dim=(0, 2))
            features[i, j] = features[j, i] = js_divergence(feats[i], feats[j]).mean()
    return {"attention": per_head.mean(-1), "attention_per_head": per_head, "features": features}


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
