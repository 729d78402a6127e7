"""Simplified transformer blocks of He & Hofmann (*Simplifying Transformer Blocks*, ICLR 2024).

- :class:`SASBlock` (sequential, "simplified attention sub-block"): no attention skip, W_V = W_P = I,
  the MLP keeps its skip::

      X̂ = β_SA·ShapedMHA(Norm₁(X)),   X_out = X̂ + β_FF·MLP(Norm₂(X̂))

- :class:`SASPBlock` (parallel): no skip at all, one pre-norm shared by both branches::

      H = Norm(X),   X_out = β_SA·ShapedMHA(H) + β_FF·MLP(H)

ShapedMHA splits the channels of its input into heads and applies shaped attention to them
(:mod:`siclip.blocks.shaped_attention`); with no value or projection weights the identity path is α·I.
Published initialisation (official ``skipless*.yaml``): α = β = γ = 1 per head, W_Q = 0 (so every
attention sub-block starts as the identity), W_K ~ N(0, 0.02²), β_SA = 1, β_FF = 0.1, and optionally a
trainable first-layer value matrix W_V = α_V·I + β_V·W' with W' = 0, α_V = β_V = 1.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from .init import init_linears
from .masking import check_block_input, resolve_block_masks
from .mlp import Mlp
from .norms import NormSpec, create_norm
from .backends import traced_kernel
from .parallel_input import activation_name, fusable_norm, norm_project_act
from .shaped_attention import ShapedAttention


class ValueSkipInit(nn.Module):
    """W_V = α_V·I + β_V·W' with W' zero-initialised (the official SAS first-layer value matrix)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim, dim))
        self.gain_skip = nn.Parameter(torch.ones(()))
        self.gain_resid = nn.Parameter(torch.ones(()))

    def combine(self, x: Tensor, projected: Tensor) -> Tensor:
        """α_V·x + β_V·(x W'ᵀ) for an already computed ``projected = x W'ᵀ``."""
        return torch.addcmul(self.gain_skip * x, self.gain_resid, projected)

    def forward(self, x: Tensor) -> Tensor:
        return self.combine(x, nn.functional.linear(x, self.weight))


class ShapedSelfAttention(nn.Module):
    """Shaped multi-head self-attention with query/key projections only (W_V = W_P = I)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        qk_bias: bool = True,
        trainable_value: bool = False,
        zero_query: bool = True,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qk_bias)
        self.k = nn.Linear(dim, dim, bias=qk_bias)
        self.value = ValueSkipInit(dim) if trainable_value else None
        self.shaped = ShapedAttention(num_heads, backend=backend)
        init_linears(self)
        if zero_query:
            nn.init.zeros_(self.q.weight)

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        causal: bool = False,
        key_padding_mask: Tensor | None = None,
        gain: Tensor | None = None,
    ) -> Tensor:
        """Shaped attention on projected ``(batch, tokens, dim)`` q, k and values v."""
        q, k, v = (rearrange(t, "b t (h d) -> b h t d", h=self.num_heads) for t in (q, k, v))
        out = self.shaped(q, k, v, causal=causal, key_padding_mask=key_padding_mask, gain=gain)
        return rearrange(out, "b h t d -> b t (h d)")

    def forward(
        self, x: Tensor, *, causal: bool = False, key_padding_mask: Tensor | None = None, gain: Tensor | None = None
    ) -> Tensor:
        v = x if self.value is None else self.value(x)
        return self.attend(self.q(x), self.k(x), v, causal=causal, key_padding_mask=key_padding_mask, gain=gain)


class _ShapedBlock(nn.Module):
    """What SAS and SAS-P share: shaped attention, the MLP and the branch gains β_SA, β_FF.

    Args:
        dim, num_heads, mlp_ratio: width, heads (dim must divide), MLP hidden width = dim·mlp_ratio.
        act, mlp_bias: the MLP's activation and biases (SAS default: ReLU, no biases).
        qk_bias: biases on the query and key projections.
        causal: default masking of :meth:`forward` calls.
        trainable_value: the first-layer value matrix W_V = α_V·I + β_V·W' (W' = 0 at init).
        zero_query: W_Q = 0 at init, so attention starts as the identity.
        beta_sa, beta_ff: initial branch gains.
        backend: attention kernel, see :func:`~siclip.blocks.shaped_attention.shaped_attention`.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        *,
        act: str | nn.Module = "relu",
        mlp_bias: bool = False,
        qk_bias: bool = True,
        causal: bool = False,
        trainable_value: bool = False,
        zero_query: bool = True,
        beta_sa: float = 1.0,
        beta_ff: float = 0.1,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.dim, self.causal = dim, causal
        self.attn = ShapedSelfAttention(
            dim, num_heads, qk_bias=qk_bias, trainable_value=trainable_value, zero_query=zero_query, backend=backend
        )
        self.mlp = Mlp(dim, round(dim * mlp_ratio), act=act, bias=mlp_bias)
        init_linears(self.mlp)
        self.gain_attn = nn.Parameter(torch.tensor(float(beta_sa)))
        self.gain_mlp = nn.Parameter(torch.tensor(float(beta_ff)))

    @property
    def num_heads(self) -> int:
        return self.attn.num_heads


class SASBlock(_ShapedBlock):
    """Sequential simplified block: X̂ = β_SA·ShapedMHA(Norm₁(X)), X_out = X̂ + β_FF·MLP(Norm₂(X̂)).

    ``norm`` names the two pre-norms; every other argument is :class:`_ShapedBlock`'s.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, *, norm: NormSpec = "layernorm", **kwargs) -> None:
        super().__init__(dim, num_heads, mlp_ratio, **kwargs)
        self.norm1 = create_norm(norm, dim)
        self.norm2 = create_norm(norm, dim)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None, causal: bool | None = None, **kw) -> Tensor:
        check_block_input(x, self.dim, type(self).__name__)
        causal, key_padding_mask = resolve_block_masks(self.causal, key_padding_mask, causal, **kw)
        x = self.attn(self.norm1(x), causal=causal, key_padding_mask=key_padding_mask, gain=self.gain_attn)
        return torch.addcmul(x, self.gain_mlp, self.mlp(self.norm2(x)))


class SASPBlock(_ShapedBlock):
    """Parallel simplified block: X_out = β_SA·ShapedMHA(Norm(X)) + β_FF·MLP(Norm(X)), no skips.

    ``norm`` names the one pre-norm both branches share; every other argument but ``fused_proj`` and
    ``fused_input`` is :class:`_ShapedBlock`'s. The weights stay in their own submodules (``attn.q``,
    ``attn.k``, ``mlp.fc1``), so attention weights can be shared or inherited on their own. With
    ``fused_input`` (default), a LayerNorm block without a trainable value matrix and with a GELU/ReLU/SiLU
    MLP trains through one autograd function for norm, projections and activation that concatenates nothing
    and writes no gradient sums of its own (:mod:`~siclip.blocks.parallel_input`); the same arithmetic, less
    memory traffic. Other blocks with ``fused_proj`` (default) run the query, key, optional value and first
    MLP projections as one ``dim -> 2·dim (+dim) + hidden`` matmul over the weights concatenated per call
    (a d×6d copy), like timm's ``ParallelScalingBlock``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        *,
        norm: NormSpec = "layernorm",
        fused_proj: bool = True,
        fused_input: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(dim, num_heads, mlp_ratio, **kwargs)
        self.fused_proj, self.fused_input = fused_proj, fused_input
        self.norm = create_norm(norm, dim)

    def _stacked_projection(self) -> tuple[Tensor, Tensor | None, list[int]]:
        """[W_Q; W_K; (W_V'); W_1], the matching biases (zeros where a layer has none) and the row counts."""
        attn, fc1 = self.attn, self.mlp.fc1
        layers = [(attn.q.weight, attn.q.bias), (attn.k.weight, attn.k.bias)]
        if attn.value is not None:
            layers.append((attn.value.weight, None))
        layers.append((fc1.weight, fc1.bias))
        weight = torch.cat([w for w, _ in layers])
        bias = None
        if any(b is not None for _, b in layers):
            bias = torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for w, b in layers])
        return weight, bias, [w.shape[0] for w, _ in layers]

    def _input_projections(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """q, k, values and MLP hidden pre-activation from the normalised input ``h``."""
        attn, value = self.attn, self.attn.value
        # Without autograd (inference) the stacked product saves nothing and costs a d×6d weight copy per call,
        # and its q, k and hidden columns come out strided, which SDPA copies and GELU reads slowly: separate
        # products ran the text encoder 5 % faster on a CPU, at batch 1 and 32 (benchmarks/RESULTS.md).
        if not self.fused_proj or not torch.is_grad_enabled():
            v = h if value is None else value(h)
            return attn.q(h), attn.k(h), v, self.mlp.fc1(h)
        weight, bias, sizes = self._stacked_projection()
        parts = nn.functional.linear(h, weight, bias).split(sizes, dim=-1)
        q, k, hidden = parts[0], parts[1], parts[-1]
        v = h if value is None else value.combine(h, parts[2])
        return q, k, v, hidden

    def _fused_activation(self) -> str | None:
        """The activation's name when norm, projection and activation can run as one function
        (:mod:`~siclip.blocks.parallel_input`), else None."""
        if not (self.fused_input and self.fused_proj) or self.attn.value is not None or not fusable_norm(self.norm):
            return None
        if not torch.is_grad_enabled():  # its backward is the point; without one the composed ops are as fast
            return None
        if torch.compiler.is_compiling():  # Inductor fuses the unfused path's elementwise passes itself
            return None
        if torch.jit.is_tracing() or traced_kernel() is not None:  # a traced graph (fvcore's FLOP count, ONNX) cannot see into an autograd Function
            return None
        return activation_name(self.mlp.act)

    def _attention_and_activation(self, x: Tensor, causal: bool, key_padding_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """β_SA·ShapedMHA(Norm(X)) and the MLP's activation act(fc1(Norm(X)))."""
        act = self._fused_activation()
        if act is not None:
            attn, fc1 = self.attn, self.mlp.fc1
            weights, biases = (attn.q.weight, attn.k.weight, fc1.weight), (attn.q.bias, attn.k.bias, fc1.bias)
            q, k, v, activation = norm_project_act(x, self.norm, weights, biases, act)
        else:
            q, k, v, hidden = self._input_projections(self.norm(x))
            activation = self.mlp.act(hidden)
        a = self.attn.attend(q, k, v, causal=causal, key_padding_mask=key_padding_mask, gain=self.gain_attn)
        return a, activation

    def forward_branches(
        self, x: Tensor, key_padding_mask: Tensor | None = None, causal: bool | None = None, **kw
    ) -> tuple[Tensor, Tensor]:
        """The two terms of the output, ``(β_SA·ShapedMHA(Norm(X)), β_FF·MLP(Norm(X)))``, for analysis."""
        check_block_input(x, self.dim, type(self).__name__)
        causal, key_padding_mask = resolve_block_masks(self.causal, key_padding_mask, causal, **kw)
        a, activation = self._attention_and_activation(x, causal, key_padding_mask)
        return a, self.gain_mlp * self.mlp.fc2(activation)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None, causal: bool | None = None, **kw) -> Tensor:
        check_block_input(x, self.dim, type(self).__name__)
        causal, key_padding_mask = resolve_block_masks(self.causal, key_padding_mask, causal, **kw)
        return self._add_mlp_output(*self._attention_and_activation(x, causal, key_padding_mask))

    def _add_mlp_output(self, a: Tensor, activation: Tensor) -> Tensor:
        """a + β_FF·fc2(activation) as one matrix product whose epilogue adds ``a``, so the MLP output is never
        written. β_FF scales the smaller operand: fc2's d×4d weights for a large batch (its gradient is then a
        reduction over weights, not activations), the activations when there are fewer of them than weights
        (a batch-1 text query has 77·4d).

        An exported graph, whose batch is a symbol, scales the weights (constants the exporter folds) and writes a
        product and a sum that int8 quantisation rewrites. The sum runs on ``(rows, d)`` matrices: ONNX Runtime
        (1.32) fuses a 3-d Add feeding a LayerNorm, the next block's, into SkipLayerNormalization, whose CPU
        kernel ran SiCLIP-S0's text blocks 4 % slower at batch 1 than the Add and LayerNorm it replaces."""
        fc2, gain = self.mlp.fc2, self.gain_mlp
        if traced_kernel() is not None:
            bias = None if fc2.bias is None else fc2.bias * gain
            rows = a.reshape(-1, a.shape[-1]) + nn.functional.linear(activation.reshape(-1, activation.shape[-1]), fc2.weight * gain, bias)
            return rows.view(a.shape)
        weight = fc2.weight
        if activation.numel() < weight.numel():
            activation = activation * gain
        else:
            weight = weight * gain
        out = torch.addmm(a.reshape(-1, a.shape[-1]), activation.reshape(-1, activation.shape[-1]), weight.t())
        if fc2.bias is not None:
            out = out.add_(fc2.bias * gain)
        return out.view(a.shape)
