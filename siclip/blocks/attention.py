"""Standard multi-head self-attention: softmax(QKᵀ/√d + M)·V·W_P with a fused QKV projection.

One fused path (``scaled_dot_product_attention``) and one explicit path behind ``fused_attn``, as in
timm's ``layers/attention.py``; both accept a causal flag and a key-padding mask. With ``fused_attn`` a CPU
call without autograd still takes the explicit path while its scores fit in cache, where it is faster
(:func:`~siclip.blocks.backends.explicit_is_faster`), exactly as shaped attention's ``"auto"`` does, so the
two families are compared on the same kernels.
"""

from __future__ import annotations

from einops import rearrange
from torch import Tensor, nn

from .backends import explicit_is_faster, needs_autograd, softmax_attention, traced_kernel
from .masking import check_key_padding_mask, sdpa_mask


class Attention(nn.Module):
    """Multi-head self-attention on ``(batch, tokens, dim)``; ``qkv`` is one ``dim -> 3·dim`` linear."""

    def __init__(
        self, dim: int, num_heads: int, *, qkv_bias: bool = True, proj_bias: bool = True, fused_attn: bool = True
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.fused_attn = fused_attn
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x: Tensor, *, causal: bool = False, key_padding_mask: Tensor | None = None) -> Tensor:
        batch, tokens, _ = x.shape
        check_key_padding_mask(key_padding_mask, batch, tokens, causal)
        q, k, v = rearrange(self.qkv(x), "b t (three h d) -> three b h t d", three=3, h=self.num_heads)
        attn_mask, is_causal = sdpa_mask(key_padding_mask, causal, tokens)
        autograd = needs_autograd(x, self.qkv.weight)
        fused = self.fused_attn and not explicit_is_faster(x, self.num_heads, tokens, autograd)
        kernel = traced_kernel() or ("sdpa" if fused else "math")
        out = softmax_attention(q, k, v, causal=is_causal, attn_mask=attn_mask, scale=None, backend=kernel)
        return self.proj(rearrange(out, "b h t d -> b t (h d)"))
