"""Jensen–Shannon divergence between the blocks of an encoder, the measure SiCLIP shares weights by.

    JS(P ‖ Q) = ½·KL(P ‖ M) + ½·KL(Q ‖ M),   M = ½(P + Q)      (natural log: 0 ≤ JS ≤ ln 2)

Two readings (``paper_math.md`` §6 #2), both computed:

- **attention**: for blocks l and m on one calibration batch, the mean over the real query rows r (samples ×
  positions that are tokens) and heads h of JS between their attention rows ``softmax(q kᵀ/√d)`` over keys (Xiao
  et al. 2019): D(l, m) = (1/H)·Σ_h (1/R)·Σ_r JS(P_l[r, h] ‖ P_m[r, h]); per head too.
- **features**: JS between the blocks' outputs read as distributions over channels (softmax over the width of each
  token), averaged over the same real rows.

**Only real query rows count.** A padded position is a query too, and its row is whatever the library fills in
(rows over the real keys, uniform rows, NaN rows under SDPA with left padding): it says nothing about the text, and
counting it makes the divergence depend on the context length (a threshold in nats would move with it). A row counts
when it is finite, the call's masks do not make its query padding (:func:`siclip.blocks.read_attention_rows`), and the
caller's real-token mask (:func:`siclip.blocks.real_tokens`, set around a text pass; the ``attention_mask`` of a dict
of inputs) keeps it. The report says how many rows were read.

Blocks are recorded *per call* through forward hooks that keep the call's arguments, so a stack whose blocks share
weights (the same module at several positions) is measured position by position, and each block's attention is read
by its type's reader under the masks it was called with: siclip's blocks, and the original blocks of transformers,
timm and open_clip models (:func:`divergence_report` takes any model and the inputs it runs on; loading a model spec
and reading calibration files are :mod:`siclip.interop`'s and :mod:`siclip.data`'s, composed by ``siclip divergence``).
Text blocks attend over token positions, the image encoder's attention blocks over the h·w positions of their feature
map (8×8 in MCi0 at 256 px).
"""

from __future__ import annotations

import contextvars
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from einops import rearrange
from torch import Tensor, nn

from siclip.blocks import (
    PreLNBlock, SASBlock, SASPBlock, SharingPlan, block_causality, plan_sharing, read_attention, read_attention_rows, real_tokens,
)  # fmt: skip
from siclip.blocks.readers import ATTENTION_READERS, current_real_tokens, has_attention_reader
from siclip.blocks.sharing import adjacent_divergences
from siclip.wording import count

from .figures import pyplot, save_figure

FORMAT = "siclip-divergence-1"
MASKED_CALLS = (PreLNBlock, SASBlock, SASPBlock)  # siclip's blocks whose call takes (x, key_padding_mask, causal)


def js_divergence(p: Tensor, q: Tensor, dim: int = -1) -> Tensor:
    """Exact JS divergence (nats) between distributions along ``dim``; 0·log 0 = 0."""
    m = (p + q) / 2
    kl_pm = torch.xlogy(p, p).sum(dim) - torch.xlogy(p, m).sum(dim)
    kl_qm = torch.xlogy(q, q).sum(dim) - torch.xlogy(q, m).sum(dim)
    return (kl_pm + kl_qm) / 2


@torch.no_grad()
def attention_probabilities(block: nn.Module, x: Tensor, key_padding_mask: Tensor | None = None, causal: bool | None = None) -> Tensor:
    """``(batch, heads, tokens, tokens)`` softmax attention ``block`` computes on its input ``x`` alone, with
    ``key_padding_mask`` (True = hidden) and ``causal`` (None: the block's own, :func:`siclip.blocks.block_causality`):
    hidden keys get probability 0.

    A siclip block takes the masks in its own call. Any other block is read on ``x`` and restricted to the visible
    keys, P' = P·V / Σ_k P·V (a softmax restricted to a subset of keys is the renormalised softmax): a block that is
    causal by itself (a CLIP text layer, GPT-2) stays causal; one that cannot tell whether it is (an open_clip residual
    block serves both towers) is refused unless ``causal`` is given; ``causal=False`` for a causal block is refused."""
    if isinstance(block, MASKED_CALLS):
        kwargs = {k: v for k, v in (("key_padding_mask", key_padding_mask), ("causal", causal)) if v is not None}
        return read_attention(block, (x,), kwargs)
    own = block_causality(block)
    if causal is None:
        if own is None:
            raise ValueError(f"a {type(block).__qualname__} does not say whether it attends causally (its model passes the mask on each "
                             "call): pass causal=True or causal=False")  # fmt: skip
        causal = own
    elif own and not causal:
        raise ValueError(f"a {type(block).__qualname__} attends causally by itself: its attention cannot be read with causal=False")
    probs = read_attention(block, (x,), {})
    tokens = probs.shape[-1]
    visible = torch.ones(probs.shape[0], 1, tokens, tokens, dtype=torch.bool, device=probs.device)
    if causal:
        visible = visible & torch.ones(tokens, tokens, dtype=torch.bool, device=probs.device).tril()
    if key_padding_mask is not None:
        visible = visible & ~key_padding_mask[:, None, None, :].bool()
    restricted = probs * visible
    return restricted / restricted.sum(-1, keepdim=True)


@dataclass
class Call:
    """One call of a block, as the host model made it: arguments, output, and the caller's real-token mask."""

    block: nn.Module
    args: tuple
    kwargs: dict
    output: object
    tokens: Tensor | None = None  # (batch, tokens) True = a real token, from siclip.blocks.real_tokens


# Set while a dict of both ``input_ids`` / ``attention_mask`` and ``pixel_values`` runs: the mask then applies to the
# block calls shaped like it (the text tower's) and not to the image tower's, whose calls have their own token count.
_TEXT_MASK_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("siclip_text_mask_only", default=False)


@torch.no_grad()
def record_blocks(blocks, run) -> list[Call]:
    """Every call of a block of ``blocks`` while ``run()`` executes, in order: the call as the host model made it,
    masks included, so a reader can interpret it as the block did, and the real-token mask in force then."""
    calls: list[Call] = []

    def record(module, args, kwargs, out):
        tokens = current_real_tokens()
        if tokens is not None and _TEXT_MASK_ONLY.get() and tuple(tokens.shape) != tuple(_token_features(out).shape[:2]):
            tokens = None  # a two-tower call: the tokenizer's mask is the text tower's; an image tower's calls have their own shape
        calls.append(Call(module, args, dict(kwargs), out, tokens))

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


def real_rows(probs: Tensor, padded: Tensor | None, tokens: Tensor | None) -> Tensor:
    """``(batch, queries)`` True for the query rows that count: finite in every head, not padding by the call's masks
    (``padded``), and real by the caller's mask (``tokens``)."""
    batch, _, queries, _ = probs.shape
    rows = torch.isfinite(probs).all(-1).all(1)
    if padded is not None:
        rows = rows & ~padded.to(rows.device)
    if tokens is not None:
        if tuple(tokens.shape) != (batch, queries):
            raise ValueError(f"the real-token mask {tuple(tokens.shape)} does not fit a block call on {batch} sequences of {queries} tokens")
        rows = rows & tokens.to(rows.device)
    return rows


class NotCalled(ValueError):
    """The run never called the blocks of a stack (it reads another tower)."""


@torch.no_grad()
def block_divergences(blocks, run) -> dict[str, Tensor]:
    """Pairwise JS matrices over the block calls made by ``run()``, over the query rows real in every call.

    Returns ``attention`` (n, n), ``attention_per_head`` (n, n, heads), ``features`` (n, n), and ``rows`` (the
    real query rows read, samples × positions) of ``rows_total``.
    """
    calls = record_blocks(blocks, run)
    if not calls:
        raise NotCalled("none of these blocks was called")
    if len(calls) < 2:
        raise ValueError("need at least two block calls to compare")
    reads = [read_attention_rows(c.block, c.args, c.kwargs) for c in calls]
    shapes = {tuple(r.probs.shape) for r in reads}
    if len(shapes) != 1:
        raise ValueError(f"the calls of one stack read attention of different shapes {sorted(shapes)}")
    rows = torch.stack([real_rows(r.probs, r.padded_queries, c.tokens) for r, c in zip(reads, calls)]).all(0)
    if not bool(rows.any()):
        raise ValueError("no query row is a real token in every call (every row is padding or not finite)")
    # Each call's real rows as (rows, heads, keys), float64.
    probs = [rearrange(r.probs.double(), "b h q k -> b q h k")[rows] for r in reads]
    feats = [torch.softmax(_token_features(c.output).double(), dim=-1)[rows] for c in calls]
    n, heads = len(calls), probs[0].shape[1]
    per_head = torch.zeros(n, n, heads, dtype=torch.float64)
    features = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(i + 1, n):
            per_head[i, j] = per_head[j, i] = js_divergence(probs[i], probs[j]).mean(0)
            features[i, j] = features[j, i] = js_divergence(feats[i], feats[j]).mean()
    return {"attention": per_head.mean(-1), "attention_per_head": per_head, "features": features, "rows": int(rows.sum()),
            "rows_total": rows.numel()}  # fmt: skip


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
class PlanChoice:
    """A sharing plan and what picked it: the strategy and its parameter (a threshold in nats, or a number of runs)."""

    strategy: str
    plan: SharingPlan
    threshold: float | None = None
    max_groups: int | None = None

    def to_dict(self) -> dict:
        return {"strategy": self.strategy, "threshold": self.threshold, "max_groups": self.max_groups,
                "groups": [list(g) for g in self.plan.groups]}  # fmt: skip


def _plan_text(plan: SharingPlan) -> str:
    return " ".join("[" + ",".join(map(str, g)) + "]" for g in plan.groups)


@dataclass
class DivergenceReport:
    """Divergences between the adjacent and all blocks of each stack of a model, and the sharing plans they give.

    ``groups[stack]`` holds ``blocks`` (names), ``attention`` and ``features`` (n × n JS matrices, nats),
    ``attention_per_head``, ``rows`` (real query rows read) of ``rows_total``, ``plans`` (strategy →
    :class:`PlanChoice`) and ``plan`` (the optimal partition into ``max_groups`` runs of adjacent blocks, by attention
    JS). ``print(report)`` shows the tables; :meth:`save` writes them (``divergence.md``), ``divergence.json`` (one
    schema, :data:`FORMAT`) and the heatmaps."""

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
        lines = [f"{self.model}: Jensen–Shannon divergence between adjacent blocks (nats; 0 = identical, ln 2 = disjoint), "
                 "over the query rows that are real tokens", "", "| stack | blocks | query rows read |", "|---|---:|---:|"]  # fmt: skip
        lines += [f"| {s} | {len(g['blocks'])} | {g['rows']} of {g['rows_total']} |" for s, g in self.groups.items()]
        lines += ["", "| stack | pair | attention | features |", "|---|---|---:|---:|"]
        for _, r in self.table().iterrows():
            lines.append(f"| {r['stack']} | {r['pair']} | {r['attention']:.4f} | {r['features']:.4f} |")
        lines += ["", "| stack | strategy | parameter | plan |", "|---|---|---|---|"]
        for stack, g in self.groups.items():
            for choice in g["plans"].values():
                parameter = (f"threshold {choice.threshold:.4g} nats (the median adjacent divergence)" if choice.threshold is not None
                             else count(choice.max_groups, "run") if choice.max_groups is not None else "")  # fmt: skip
                lines.append(f"| {stack} | {choice.strategy} | {parameter} | {_plan_text(choice.plan)} |")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """The report as plain data (:data:`FORMAT`): per stack its blocks, rows read, matrices and plans (lists of lists)."""
        stacks = {}
        for stack, g in self.groups.items():
            stacks[stack] = {"blocks": list(g["blocks"]), "rows_read": g["rows"], "rows_total": g["rows_total"],
                             "attention": g["attention"].tolist(), "attention_per_head": g["attention_per_head"].tolist(),
                             "features": g["features"].tolist(), "plans": [c.to_dict() for c in g["plans"].values()],
                             "optimal": [list(x) for x in g["plan"].groups]}  # fmt: skip
        return {"format": FORMAT, "model": self.model, "unit": "nats", "stacks": stacks}

    def save(self, out_dir: str | Path) -> list[Path]:
        """Heatmaps (``divergence_<stack>_<reading>.png``), the tables ``print(report)`` shows (``divergence.md``) and
        ``divergence.json`` (:meth:`to_dict`, with the heatmaps' names) in ``out_dir``; returns the paths written: the
        heatmaps, then the tables, the JSON last."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for stack, g in self.groups.items():
            slug = stack.replace(".", "_") or "model"
            labels = [name.rsplit(".", 1)[-1] if name.rsplit(".", 1)[-1].isdigit() else name for name in g["blocks"]]
            labels = [f"block {label}" if label.isdigit() else label for label in labels]
            for reading in ("attention", "features"):
                title = f"{self.model}: {stack} ({reading})"
                paths.append(plot_heatmap(g[reading], out / f"divergence_{slug}_{reading}.png", title, labels))
        from siclip.storage import write_text_atomic

        record = {**self.to_dict(), "heatmaps": [p.name for p in paths]}
        tables = write_text_atomic(str(self) + "\n", out / "divergence.md")
        return [*paths, tables, write_text_atomic(json.dumps(record, indent=1), out / "divergence.json")]


def _runner(model: nn.Module, inputs):
    if callable(inputs) and not isinstance(inputs, (Tensor, nn.Module)):
        return inputs
    if isinstance(inputs, dict):
        mask = inputs.get("attention_mask")
        if isinstance(mask, Tensor) and mask.dim() == 2:  # a tokenizer's mask: 1 for tokens, 0 for padding
            both_towers = "pixel_values" in inputs  # a CLIPModel called on captions and images at once

            def run():
                flag = _TEXT_MASK_ONLY.set(both_towers)
                try:
                    with real_tokens(mask.bool()):
                        return model(**inputs)
                finally:
                    _TEXT_MASK_ONLY.reset(flag)

            return run
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
    causal and padding masks the model itself applies, over the query rows that are real tokens (a dict's
    ``attention_mask``, or :func:`siclip.blocks.real_tokens` inside a function)."""
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
            try:
                d = block_divergences([b for _, b in blocks], run)
            except NotCalled:  # a stack the inputs do not reach (the image tower of a text-only run)
                continue
            n = d["attention"].shape[0]
            if n != len(blocks):
                raise ValueError(f"{stack}: {len(blocks)} blocks made {n} calls on these inputs; a block called twice cannot be placed")
            wanted = max_groups.get(stack) if isinstance(max_groups, dict) else max_groups
            plans = plan_choices(d["attention"], max_groups=wanted)
            report.groups[stack] = {"blocks": [n for n, _ in blocks], **d, "plans": plans, "plan": plans["optimal"].plan}
    finally:
        model.train(was_training)
    if not report.groups:
        raise ValueError(f"no stack of {type(model).__name__} with two or more blocks ran on these inputs: there is nothing to compare")
    return report


def text_divergences(model, ids: Tensor) -> dict[str, Tensor]:
    """Divergences between the text transformer blocks of a siclip CLIP on a batch of token ids, over the positions up
    to each caption's end-of-text token (the largest id, as siclip's text encoder pools)."""
    from siclip.data.tokenizer import real_token_mask

    def run():
        with real_tokens(real_token_mask(ids)):
            model.text(ids)

    return block_divergences(model.text.transformer, run)


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

    from siclip.data.tokenizer import real_token_mask

    def read_text(m):
        with real_tokens(real_token_mask(ids)):
            m.text(ids)

    rows = []
    for step, model in sorted(snapshots.items()):
        model.eval()
        towers = {"text": (model.text.transformer, lambda m=model: read_text(m)),
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


def plan_choices(divergence: Tensor, *, max_groups: int | None = None) -> dict[str, PlanChoice]:
    """The plan each strategy picks, with its parameter: none, adjacent pairs, threshold at the median adjacent
    divergence, and the optimal partition into ``max_groups`` (default half the blocks) runs."""
    n = divergence.shape[0]
    matrix = divergence.detach().cpu().numpy()
    threshold = float(sorted(adjacent_divergences(matrix))[(n - 2) // 2])
    runs = max_groups or max(1, n // 2)
    return {
        "none": PlanChoice("none", plan_sharing("none", n)),
        "adjacent": PlanChoice("adjacent", plan_sharing("adjacent", n)),
        "threshold": PlanChoice("threshold", plan_sharing("threshold", n, matrix, threshold=threshold), threshold=threshold),
        "optimal": PlanChoice("optimal", plan_sharing("optimal", n, matrix, max_groups=runs), max_groups=runs),
    }


def sharing_plans(divergence: Tensor, *, max_groups: int | None = None) -> dict[str, SharingPlan]:
    """:func:`plan_choices`' plans by strategy name."""
    return {strategy: choice.plan for strategy, choice in plan_choices(divergence, max_groups=max_groups).items()}


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
