"""MCi, MobileCLIP's image encoder: a FastViT (Vasu et al., ICCV 2023) with a projection head.

Stem (3 MobileOne blocks, /4) → stages of RepMixer blocks (depthwise token mixing, reparameterisable)
joined by large-kernel patch embeddings (/2 each, squeeze-excite into the last two stages) → a
conditional positional encoding (RepCPE) and attention blocks in the last stage → a depthwise 3×3
expansion to 2× width with squeeze-excite → global average pool → linear projection to the embedding.
Module names follow Apple's released checkpoint, so its keys map one to one (see ``checkpoint.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import copy

import torch
from einops import rearrange
from torch import Tensor, nn

from siclip.blocks import (
    Attention, ConversionReport, SASPBlock2d, SASPConversion, register_attention_reader, register_block_causality, register_converter,
)  # fmt: skip
from siclip.blocks.readers import softmax_attention
from siclip.blocks.token_dropout import register_token_dropout

from .mobileone import MobileOneBlock, ReparamLargeKernelConv, conv_bn
from .reparam import depthwise_conv_args, identity_kernel, make_conv
from .stages import run_stages


@dataclass(frozen=True)
class ImageConfig:
    """MCi0 by default: depths [2, 6, 10, 2], widths [64, 128, 256, 512], attention in the last stage. With no
    ``"attention"`` token mixer it is the pure-CNN tower: the stem, RepMixer stages and the head, no RepCPE."""

    layers: tuple[int, ...] = (2, 6, 10, 2)
    dims: tuple[int, ...] = (64, 128, 256, 512)
    token_mixers: tuple[str, ...] = ("repmixer", "repmixer", "repmixer", "attention")
    se_downsamples: tuple[bool, ...] = (False, False, True, True)
    mlp_ratio: float = 3.0
    head_dim: int = 32
    image_size: int = 256
    repmixer_kernel: int = 3
    down_patch: int = 7
    pos_kernel: int = 7
    cls_ratio: float = 2.0
    layer_scale_init: float = 1e-5
    family: str = "mci"  # siclip.models.towers: every token mixer "repmixer" makes this the pure-CNN tower


class ConvFFN(nn.Module):
    """Depthwise conv+BN, then 1×1 expansion, GELU, 1×1 projection (FastViT's MLP)."""

    def __init__(self, dim: int, hidden: int, kernel: tuple[int, int] = (7, 7)) -> None:
        super().__init__()
        self.conv = conv_bn(dim, dim, kernel, 1, (kernel[0] // 2, kernel[1] // 2), dim)
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)
        for conv in (self.conv.conv, self.fc1, self.fc2):
            nn.init.trunc_normal_(conv.weight, std=0.02)
        nn.init.zeros_(self.fc1.bias), nn.init.zeros_(self.fc2.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(self.conv(x))))


class RepMixer(nn.Module):
    """x + ls·(mixer(x) − norm(x)): depthwise token mixing; reparameterises into one depthwise conv."""

    def __init__(self, dim: int, kernel: tuple[int, int], layer_scale_init: float) -> None:
        super().__init__()
        padding = (kernel[0] // 2, kernel[1] // 2)
        self.kernel, self.dim = kernel, dim
        self.norm = MobileOneBlock(dim, dim, kernel, 1, padding, dim, use_act=False, use_scale_branch=False, use_conv_branch=False)
        self.mixer = MobileOneBlock(dim, dim, kernel, 1, padding, dim, use_act=False)
        self.layer_scale = nn.Parameter(torch.full((dim, 1, 1), layer_scale_init))
        self.reparam_conv: nn.Conv2d | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.reparam_conv is not None:
            return self.reparam_conv(x)
        return x + self.layer_scale * (self.mixer(x) - self.norm(x))

    def reparameterize(self) -> None:
        if self.reparam_conv is not None:
            return
        k_mix, b_mix = self.mixer.fused_kernel_bias()
        k_norm, b_norm = self.norm.fused_kernel_bias()
        scale = self.layer_scale
        kernel = identity_kernel(self.dim, self.dim, self.kernel, k_mix) + scale.unsqueeze(-1) * (k_mix - k_norm)
        self.reparam_conv = make_conv(depthwise_conv_args(self.dim, self.kernel), kernel, scale.flatten() * (b_mix - b_norm))
        self.norm = self.mixer = self.layer_scale = None


class RepMixerBlock(nn.Module):
    """x ← RepMixer(x); x ← x + ls·ConvFFN(x) on ``(batch, channels, height, width)`` maps."""

    def __init__(self, dim: int, mlp_ratio: float, kernel: tuple[int, int], layer_scale_init: float, ffn_kernel=(7, 7)) -> None:
        super().__init__()
        self.token_mixer = RepMixer(dim, kernel, layer_scale_init)
        self.convffn = ConvFFN(dim, int(dim * mlp_ratio), ffn_kernel)
        self.layer_scale = nn.Parameter(torch.full((dim, 1, 1), layer_scale_init))

    def forward(self, x: Tensor) -> Tensor:
        x = self.token_mixer(x)
        return x + self.layer_scale * self.convffn(x)


class AttentionBlock(nn.Module):
    """x ← x + ls₁·MHSA(BN(x)); x ← x + ls₂·ConvFFN(x), with the map's pixels as tokens."""

    def __init__(self, dim: int, mlp_ratio: float, head_dim: int, layer_scale_init: float) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(dim)
        self.token_mixer = Attention(dim, dim // head_dim, qkv_bias=False, proj_bias=True)
        self.convffn = ConvFFN(dim, int(dim * mlp_ratio))
        self.layer_scale_1 = nn.Parameter(torch.full((dim, 1, 1), layer_scale_init))
        self.layer_scale_2 = nn.Parameter(torch.full((dim, 1, 1), layer_scale_init))

    def forward(self, x: Tensor) -> Tensor:
        height = x.shape[2]
        tokens = self.token_mixer(rearrange(self.norm(x), "b c h w -> b (h w) c"))
        x = x + self.layer_scale_1 * rearrange(tokens, "b (h w) c -> b c h w", h=height)
        return x + self.layer_scale_2 * self.convffn(x)


@register_block_causality(AttentionBlock)
def _not_causal(block: AttentionBlock) -> bool:
    return False  # attention over a map's positions


@register_attention_reader(AttentionBlock)
def read_attention_block(block: AttentionBlock, args: tuple, kwargs: dict) -> Tensor:
    """softmax(QKᵀ/√d) over the map's positions, the MHSA of ``block(x)`` (no mask)."""
    q, k, _ = block.token_mixer.qkv(rearrange(block.norm(args[0]), "b c h w -> b (h w) c")).chunk(3, dim=-1)
    return softmax_attention(q, k, block.token_mixer.num_heads)


@register_converter(AttentionBlock)
@torch.no_grad()
def convert_attention_block(block: AttentionBlock, options: SASPConversion) -> tuple[SASPBlock2d, ConversionReport]:
    """MCi's attention block as a SAS-P block: β_SA·ShapedMHA(BN(X)) + β_FF·ConvFFN(BN(X)), no skips.

    Inherited: the BatchNorm (now the one pre-norm of both branches), W_Q and W_K (rows 0:C and C:2C of
    ``qkv``), the ConvFFN with ls₂ folded into ``fc2`` (ls₂·fc2(z) = (ls₂⊙W₂)z + ls₂⊙b₂). Dropped: W_V, W_P
    and ls₁ (α, β, γ carry the attention branch's scale). New: per-head α, β, γ and β_SA, β_FF.
    The ConvFFN now reads BN(X) instead of X + ls₁·MHSA(BN(X)); with ls₁ ≈ 1e-5 at MCi's initialisation the
    two inputs differ by that term only.
    """
    if not options.fold_layer_scale:
        raise ValueError("MCi's attention blocks scale their ConvFFN by a layer scale; convert with fold_layer_scale=True")
    mixer = block.token_mixer
    dim = mixer.qkv.in_features
    w_q, w_k, w_v = mixer.qkv.weight.split(dim)
    b_q, b_k, b_v = mixer.qkv.bias.split(dim) if mixer.qkv.bias is not None else (None, None, None)
    ffn = copy.deepcopy(block.convffn)
    scale = block.layer_scale_2.flatten()
    ffn.fc2.weight.mul_(scale[:, None, None, None])
    ffn.fc2.bias.mul_(scale)
    new = SASPBlock2d(
        dim, mixer.num_heads, ffn, qk_bias=b_q is not None, zero_query=False, trainable_value=options.trainable_value,
        beta_sa=options.beta_sa, beta_ff=options.beta_ff, backend=options.backend,
    ).to(device=w_q.device, dtype=w_q.dtype)  # fmt: skip
    new.norm.load_state_dict(block.norm.state_dict())
    new.attn.q.weight.copy_(w_q)
    new.attn.k.weight.copy_(w_k)
    if b_q is not None:
        new.attn.q.bias.copy_(b_q)
        new.attn.k.bias.copy_(b_k)

    report = ConversionReport()
    report.add("", {f"norm.{n}": t for n, t in new.norm.state_dict().items()}, "inherited", "BatchNorm, both branches")
    note = "zeroed (zero_query)" if options.zero_query else ""
    report.add("", {"attn.q.weight": new.attn.q.weight, "attn.q.bias": new.attn.q.bias}, "inherited", note)
    report.add("", {"attn.k.weight": new.attn.k.weight, "attn.k.bias": new.attn.k.bias}, "inherited")
    report.add("", {n: t for n, t in ffn.state_dict(prefix="ffn.").items() if not n.startswith("ffn.fc2.")}, "inherited")
    report.add("", {"ffn.fc2.weight": ffn.fc2.weight, "ffn.fc2.bias": ffn.fc2.bias}, "inherited", "layer_scale_2 folded in")
    added = {f"attn.shaped.{n}": p for n, p in new.attn.shaped.named_parameters()}
    added |= {"gain_attn": new.gain_attn, "gain_mlp": new.gain_mlp}
    if new.attn.value is not None:
        added |= {f"attn.value.{n}": p for n, p in new.attn.value.named_parameters()}
    report.add("", added, "new")
    report.add("", {"token_mixer.qkv.weight[v]": w_v, "token_mixer.qkv.bias[v]": b_v}, "dropped", "W_V = I")
    report.add("", dict(mixer.proj.named_parameters(prefix="token_mixer.proj")), "dropped", "W_P = I")
    report.add("", {"layer_scale_1": block.layer_scale_1}, "dropped", "α, β, γ carry the attention scale")
    report.add("", {"layer_scale_2": block.layer_scale_2}, "dropped", "folded into ffn.fc2")
    if options.zero_query:  # q = 0 for every token makes softmax(·) = C, so the attention branch is α·BN(X)
        new.attn.q.weight.zero_()
        if new.attn.q.bias is not None:
            new.attn.q.bias.zero_()
    return new, report


class PatchEmbed(nn.Module):
    """Downsampling between stages: large-kernel depthwise conv (/2), then a 1×1 MobileOne block."""

    def __init__(self, in_ch: int, out_ch: int, patch: int, use_se: bool) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            ReparamLargeKernelConv(in_ch, out_ch, patch, 2, 3, use_se=use_se), MobileOneBlock(out_ch, out_ch, 1)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class RepCPE(nn.Module):
    """Conditional positional encoding x + DWConv(x) (Chu et al. 2021); folds into one conv."""

    def __init__(self, dim: int, kernel: int) -> None:
        super().__init__()
        self.dim, self.kernel = dim, kernel
        self.pe = nn.Conv2d(dim, dim, kernel, 1, kernel // 2, groups=dim)
        self.reparam_conv: nn.Conv2d | None = None

    def forward(self, x: Tensor) -> Tensor:
        return self.reparam_conv(x) if self.reparam_conv is not None else x + self.pe(x)

    def reparameterize(self) -> None:
        if self.reparam_conv is not None:
            return
        kernel = identity_kernel(self.dim, self.dim, (self.kernel,) * 2, self.pe.weight) + self.pe.weight
        self.reparam_conv = make_conv(depthwise_conv_args(self.dim, (self.kernel,) * 2), kernel, self.pe.bias)
        self.pe = None


class GlobalPool2D(nn.Module):
    """Mean over height and width, then ``@ proj`` (no bias), as MobileCLIP's image head."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.proj = nn.Parameter(torch.randn(in_dim, out_dim) * in_dim**-0.5)

    def forward(self, x: Tensor) -> Tensor:
        return x.mean((2, 3)) @ self.proj


class MCi(nn.Module):
    """The MobileCLIP image encoder: ``(batch, 3, S, S)`` in [0, 1] → ``(batch, embed_dim)`` (unnormalised)."""

    def __init__(self, config: ImageConfig, embed_dim: int) -> None:
        super().__init__()
        self.config = config
        c0 = config.dims[0]
        self.patch_embed = nn.Sequential(
            MobileOneBlock(3, c0, 3, 2, 1), MobileOneBlock(c0, c0, 3, 2, 1, groups=c0), MobileOneBlock(c0, c0, 1)
        )
        network: list[nn.Module] = []
        kernel = (config.repmixer_kernel,) * 2
        for i, (depth, dim, mixer) in enumerate(zip(config.layers, config.dims, config.token_mixers)):
            if i > 0:
                network.append(PatchEmbed(config.dims[i - 1], dim, config.down_patch, config.se_downsamples[i]))
            if mixer == "attention":
                network.append(RepCPE(dim, config.pos_kernel))
                blocks = [AttentionBlock(dim, config.mlp_ratio, config.head_dim, config.layer_scale_init) for _ in range(depth)]
            elif mixer == "repmixer":
                blocks = [RepMixerBlock(dim, config.mlp_ratio, kernel, config.layer_scale_init) for _ in range(depth)]
            else:
                raise ValueError(f"unknown token mixer {mixer!r}; choose 'repmixer' or 'attention'")
            network.append(nn.Sequential(*blocks))
        self.network = nn.ModuleList(network)
        last = config.dims[-1]
        wide = int(last * config.cls_ratio)
        self.conv_exp = MobileOneBlock(last, wide, 3, 1, 1, groups=last, use_se=True, se_reduced=wide // 16)
        self.head = GlobalPool2D(wide, embed_dim)
        self.grad_checkpointing = False

    def stages(self) -> list[nn.Module]:
        """The encoder as a chain of units, one block each, in the order they run (see :func:`run_stages`)."""
        units: list[nn.Module] = [self.patch_embed]
        for stage in self.network:
            units.extend(stage if isinstance(stage, nn.Sequential) else [stage])
        return [*units, self.conv_exp, self.head]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each trainable block's activations in backward instead of storing them."""
        self.grad_checkpointing = enable

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"images must be (batch, 3, height, width), got shape {tuple(x.shape)}")
        return run_stages(self.stages(), x, checkpointing=self.grad_checkpointing)


@register_token_dropout(MCi)
def refuse_token_dropout(tower: MCi, ratio: float):
    """FLIP's masking is refused on MCi, with the reason: its tokens never leave the grid.

    The attention stage is convolutional around its attention: a RepCPE depthwise 7×7 convolution before it, and in
    every attention block a BatchNorm2d over the map and a ConvFFN whose depthwise 7×7 convolution mixes neighbours;
    after it a depthwise 3×3 expansion with squeeze-excite. Applying the CPE on the full grid and then dropping tokens
    leaves those convolutions no grid. Zero-filling the dropped positions instead would put zeros into BatchNorm's
    batch statistics and let every convolution spread them — a different function from the one evaluated unmasked —
    and a sound version (masked convolutions and masked BatchNorm, as ConvMAE) would save little: the attention
    blocks are 14.5 % of MCi0's FLOPs at 256 px (token mixing alone 6.0 %; PyTorch's counter), so masking half their
    tokens saves at most 7 % of the tower's forward, against FLIP's 2× on a ViT. An MCi with no attention stage (a pure
    CNN tower) has no tokens to drop at all.
    """
    if "attention" not in tower.config.token_mixers:
        raise ValueError("token masking (FLIP) drops a ViT's patch tokens; this image tower is convolutional throughout (no attention "
                         "stage, no tokens): use a ViT image tower")  # fmt: skip
    raise ValueError("token masking (FLIP) is refused for MobileCLIP's MCi image tower: its attention stage mixes tokens by "
                     "convolutions and BatchNorm over the full grid, which dropping tokens breaks, and masking its attention "
                     "blocks (14.5 % of MCi0's FLOPs) would save at most 7 %; use a ViT image tower")  # fmt: skip
