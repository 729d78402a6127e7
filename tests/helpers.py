"""Small helpers shared by the tests."""

import torch
from einops import rearrange
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from siclip.blocks import SASPBlock2d, shaped_attention_reference


class ShapeRecorder(TorchDispatchMode):
    """Records the shape of every tensor an aten op returns (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor):
                self.shapes.append((str(func), tuple(o.shape)))
        return out


def padding_mask(batch: int, tokens: int, generator=None) -> torch.Tensor:
    """A random right-padding mask (True = padded) that keeps at least one token per sequence."""
    lengths = torch.randint(1, tokens + 1, (batch,), generator=generator)
    lengths[0] = tokens - 2  # at least one row really padded
    return torch.arange(tokens)[None, :] >= lengths[:, None]


def randomize_(module: torch.nn.Module, std: float = 0.3) -> torch.nn.Module:
    """Move every floating parameter away from its (often trivial) initial value."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * std)
    return module


def randomized(model: nn.Module, seed: int, dtype=torch.float32) -> nn.Module:
    """Random weights, BatchNorm statistics and layer scales of order one, so that every term matters."""
    g = torch.Generator().manual_seed(seed)
    model = model.to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * (0.5 if "layer_scale" in name else 0.1))
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g, dtype=dtype) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g, dtype=dtype) + 0.5)
    return model


def reference_sasp2d(block: SASPBlock2d, x: torch.Tensor) -> torch.Tensor:
    """β_SA·(αI + β·softmax(QKᵀ/√d) − γC)·H + β_FF·ConvFFN(H), H = BN(X), written out from the parameters."""
    bn, attn, ffn = block.norm, block.attn, block.ffn
    h = (x - bn.running_mean[:, None, None]) / (bn.running_var[:, None, None] + bn.eps).sqrt()
    h = h * bn.weight[:, None, None] + bn.bias[:, None, None]
    tokens = rearrange(h, "b c h w -> b (h w) c")
    heads = attn.num_heads
    q, k, v = (rearrange(t, "b t (n d) -> b n t d", n=heads) for t in (tokens @ attn.q.weight.T, tokens @ attn.k.weight.T, tokens))
    shaped = attn.shaped
    a = shaped_attention_reference(q, k, v, shaped.alpha, shaped.beta, shaped.gamma) * block.gain_attn
    a = rearrange(a, "b n (h w) d -> b (n d) h w", h=x.shape[2])
    dw, dwbn = ffn.conv.conv, ffn.conv.bn
    z = nn.functional.conv2d(h, dw.weight, None, 1, dw.padding, 1, dw.groups)
    z = (z - dwbn.running_mean[:, None, None]) / (dwbn.running_var[:, None, None] + dwbn.eps).sqrt() * dwbn.weight[:, None, None] + dwbn.bias[:, None, None]
    z = torch.einsum("oc,bchw->bohw", ffn.fc1.weight[:, :, 0, 0], z) + ffn.fc1.bias[:, None, None]
    z = torch.einsum("oc,bchw->bohw", ffn.fc2.weight[:, :, 0, 0], nn.functional.gelu(z)) + ffn.fc2.bias[:, None, None]
    return a + block.gain_mlp * z


class MinimalViT(nn.Module):
    """A ViT image tower from siclip's blocks, for FLIP's tests and benchmark until siclip's own ViT towers land:
    patches → class token + positions → ``patch_dropout`` → Pre-LN blocks → LayerNorm → class token → projection.

    It has what :func:`siclip.blocks.token_dropout.enable_token_dropout` reads of a siclip ViT tower: a
    ``patch_dropout`` module applied after the positional embedding and before the first block, and
    ``num_prefix_tokens`` (the class token)."""

    def __init__(self, image_size: int = 32, patch: int = 8, dim: int = 32, depth: int = 2, heads: int = 2, out_dim: int = 16) -> None:
        super().__init__()
        from siclip.blocks import PreLNBlock

        tokens = (image_size // patch) ** 2
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.patch_dropout: nn.Module = nn.Identity()
        self.num_prefix_tokens = 1
        self.blocks = nn.Sequential(*[PreLNBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, out_dim, bias=False)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """``(batch, 1 + patches, dim)``: the tokens ``patch_dropout`` receives."""
        x = rearrange(self.patch_embed(images), "b d h w -> b (h w) d")
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.patch_dropout(self.embed(images)))
        return self.proj(self.norm(x[:, 0]))


def clip_with_vit(image_size: int = 32, patch: int = 8, dim: int = 32, depth: int = 2, heads: int = 2, **overrides):
    """A siclip ``CLIP`` (MobileCLIP-tiny's text tower) whose image tower is a :class:`MinimalViT`: a ViT CLIP for
    FLIP's task-level tests and benchmark, until siclip registers ViT models of its own."""
    from siclip.models import create_model

    model = create_model("mobileclip_tiny", image={"layers": [1, 1, 1, 1], "image_size": image_size}, **overrides)
    model.visual = MinimalViT(image_size, patch, dim, depth, heads, out_dim=model.embed_dim)
    return model
