"""Hugging Face transformers in siclip: block converters, attention readers, the CLIP adapter and its preprocessing.

Imported by siclip's registries the first time they meet a transformers object (never by siclip otherwise).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from einops import rearrange
from torch import Tensor, nn
from torch.nn import functional as F
from transformers.models.clip.modeling_clip import CLIPEncoderLayer
from transformers.models.gpt2.modeling_gpt2 import GPT2Block
from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer
from transformers.models.vit.modeling_vit import ViTLayer
from transformers.utils import output_capturing

from siclip.blocks import (
    AttentionRead, ConversionReport, SASPBlock, SASPConversion, read_softmax, register_attention_reader, register_block_causality,
    register_converter, register_host_fixup, sasp_from_parts,
)  # fmt: skip
from siclip.blocks.masking import decode_attention_mask
from siclip.blocks.shaped_attention import shaped_attention_matrix
from siclip.blocks.token_dropout import TokenDropout, check_ratio, register_token_dropout
from siclip.data.transforms import CLIP_MEAN, CLIP_STD, Preprocess
from siclip.interop import ADAPTERS
from siclip.interop.safety import (
    UnsafeModel, build_on_meta, check_attention, check_model_folder, check_shapes, foreign_failure, scan_record, weight_shapes,
)  # fmt: skip
from siclip.schema import MAX_CONTEXT, data_file_name
from siclip.models.loaded import LoadedClip

# Post-LN layers (BERT and its kin): refused with the reason (see _refuse_post_ln).
POST_LN_LAYERS = tuple(
    getattr(getattr(transformers.models, family), f"modeling_{family}").__dict__[name]
    for family, name in (("bert", "BertLayer"), ("roberta", "RobertaLayer"), ("electra", "ElectraLayer"), ("distilbert", "TransformerBlock"))
    if hasattr(transformers.models, family)
)

# ── block converters (SAS-P) ─────────────────────────────────────────────────────────────────────────────────────
#
# A converted layer is an instance of a subclass of the layer it replaces, so the host model's own forward, its
# gradient checkpointing and its output recording (``output_hidden_states``) treat it as that layer; it runs a
# SAS-P block inside (``.sasp``) with the host's call signature. ``output_attentions`` records, through a probe that
# is an instance of the host's attention class, the matrix that multiplies the values in shaped attention,
# A = α·I + β·softmax(QKᵀ/√d + M) − γ·C per head: what "attentions" means for a block without W_V and W_P.

_HOST_CLASSES: dict[type, type] = {}


def _torch_activation(act: nn.Module) -> nn.Module:
    """transformers' activations as the torch modules they equal (exact GELU, tanh GELU), which siclip's fused
    parallel-block path recognises; any other (QuickGELU, NewGELU's written-out formula) is kept as it is."""
    name = type(act).__name__
    if name == "GELUActivation" and getattr(act, "act", None) is nn.functional.gelu:
        return nn.GELU()
    if name in ("PytorchGELUTanh", "GELUTanh"):
        return nn.GELU(approximate="tanh")
    return act


def _attention_probe(attention_class: type) -> nn.Module:
    """An instance of the host's attention class that only hands transformers' recording hook a matrix."""
    probe_class = _HOST_CLASSES.get(attention_class)
    if probe_class is None:
        def init(self) -> None:
            nn.Module.__init__(self)

        def forward(self, matrix: Tensor) -> tuple[None, Tensor]:
            return None, matrix

        probe_class = type(f"Shaped{attention_class.__name__}Record", (attention_class,), {"__init__": init, "forward": forward,
                           "__doc__": "Records shaped attention for output_attentions; it has no weights and computes nothing."})  # fmt: skip
        _HOST_CLASSES[attention_class] = probe_class
    return probe_class()


def _attentions_requested() -> bool:
    collector = output_capturing._active_collector.get()
    return collector is not None and "attentions" in collector


class _SASPLayer:
    """The behaviour every converted transformers layer shares (mixed into a subclass of the host's layer class)."""

    def _setup(self, block: SASPBlock, probe_name: str, probe: nn.Module, causal: bool) -> None:
        nn.Module.__init__(self)
        self.sasp, self.default_causal, self.probe_name = block, causal, probe_name
        setattr(self, probe_name, probe)

    def _run(self, hidden_states: Tensor, attention_mask: Tensor | None, causal: bool) -> Tensor:
        _, padding = decode_attention_mask(attention_mask, hidden_states.shape[0], hidden_states.shape[1], causal)
        out = self.sasp(hidden_states, padding, causal)
        if _attentions_requested():
            getattr(self, self.probe_name)(self._shaped_matrix(hidden_states, padding, causal))
        return out

    @torch.no_grad()
    def _shaped_matrix(self, hidden_states: Tensor, padding: Tensor | None, causal: bool) -> Tensor:
        block = self.sasp
        h = block.norm(hidden_states)
        q, k = (rearrange(t, "b t (h d) -> b h t d", h=block.num_heads) for t in (block.attn.q(h), block.attn.k(h)))
        gains = block.attn.shaped
        matrix = shaped_attention_matrix(q, k, gains.alpha, gains.beta, gains.gamma, causal=causal, key_padding_mask=padding)
        return matrix * block.gain_attn


def _host_class(layer_class: type, forward) -> type:
    """The converted-layer class for ``layer_class``: a subclass of it whose ``forward`` is ``forward``."""
    cls = _HOST_CLASSES.get(layer_class)
    if cls is None:
        def init(self, block: SASPBlock, probe_name: str, probe: nn.Module, causal: bool = False) -> None:
            self._setup(block, probe_name, probe, causal)

        cls = type(f"SASP{layer_class.__name__}", (_SASPLayer, layer_class), {"__init__": init, "forward": forward, "__doc__":
                   f"A {layer_class.__name__} converted to SAS-P (siclip): the host's signature around ``self.sasp``."})  # fmt: skip
        _HOST_CLASSES[layer_class] = cls
    return cls


def _encoder_forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, **kwargs) -> Tensor:
    """CLIP, SigLIP and ViT layers: ``(hidden_states, attention_mask, **kwargs)``; CLIP's text model says
    ``is_causal=True`` in the keywords and passes a 4-D causal (and padding) mask or none."""
    causal = bool(kwargs.get("is_causal", self.default_causal))
    return self._run(hidden_states, attention_mask, causal)


def _gpt2_forward(self, hidden_states: Tensor, cache=None, attention_mask: Tensor | None = None, encoder_hidden_states=None,
                  encoder_attention_mask=None, use_cache: bool | None = False, **kwargs) -> Tensor:  # fmt: skip
    if encoder_hidden_states is not None:
        raise NotImplementedError("a GPT-2 block converted to SAS-P has no cross-attention: it was converted from its self-attention only")
    if use_cache and cache is not None:
        raise NotImplementedError("SAS-P blocks keep no key/value cache (they have no W_V): call the model with use_cache=False")
    return self._run(hidden_states, attention_mask, True)


def _linear_from_conv1d(conv: nn.Module) -> nn.Linear:
    """GPT-2's ``Conv1D`` (y = x·W + b, W stored (in, out)) as the ``nn.Linear`` it equals."""
    weight = conv.weight
    linear = nn.Linear(weight.shape[0], weight.shape[1], bias=conv.bias is not None).to(weight.device, weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight.t())
        if conv.bias is not None:
            linear.bias.copy_(conv.bias)
    return linear


def _wrap(layer: nn.Module, block: SASPBlock, report: ConversionReport, forward, probe_name: str, attention_class: type,
          dropped: dict, causal: bool = False) -> tuple[nn.Module, ConversionReport]:  # fmt: skip
    """The converted layer and its report (rows of the SAS-P block under ``sasp.``, the dropped tensors by their
    original names)."""
    converted = _host_class(type(layer), forward)(block, probe_name, _attention_probe(attention_class), causal)
    converted.train(layer.training)
    out = ConversionReport()
    out.rows = [{**row, "parameter": f"sasp.{row['parameter']}"} for row in report.rows]
    for (names, note), tensors in dropped.items():
        out.add("", dict(zip(names, tensors)), "dropped", note)
    return converted, out


def _qk(attention: nn.Module) -> tuple[nn.Linear, nn.Linear]:
    return attention.q_proj, attention.k_proj


@register_converter(CLIPEncoderLayer)
@register_converter(SiglipEncoderLayer)
def _convert_clip_layer(layer: nn.Module, options: SASPConversion) -> tuple[nn.Module, ConversionReport]:
    """CLIP (text and vision) and SigLIP layers: ``X + Attn(LN₁X)``, then ``+ MLP(LN₂·)``."""
    attn, mlp = layer.self_attn, layer.mlp
    q, k = _qk(attn)
    block, report = sasp_from_parts(norm=layer.layer_norm1, q=q, k=k, fc1=mlp.fc1, act=_torch_activation(mlp.activation_fn), fc2=mlp.fc2,
                                    num_heads=attn.num_heads, options=options)  # fmt: skip
    dropped = {(("self_attn.v_proj.weight", "self_attn.v_proj.bias"), "W_V = I"): (attn.v_proj.weight, attn.v_proj.bias),
               (("self_attn.out_proj.weight", "self_attn.out_proj.bias"), "W_P = I"): (attn.out_proj.weight, attn.out_proj.bias),
               (("layer_norm2.weight", "layer_norm2.bias"), "one shared pre-norm"): (layer.layer_norm2.weight, layer.layer_norm2.bias)}  # fmt: skip
    return _wrap(layer, block, report, _encoder_forward, "self_attn", type(attn), dropped, causal=_clip_text_layer(layer))


@register_converter(ViTLayer)
def _convert_vit_layer(layer: nn.Module, options: SASPConversion) -> tuple[nn.Module, ConversionReport]:
    """ViT layers: ``X + Attn(LN_before X)``, then ``+ MLP(LN_after ·)`` (dropout dropped with the skips)."""
    attn, mlp = layer.attention, layer.mlp
    q, k = _qk(attn)
    block, report = sasp_from_parts(norm=layer.layernorm_before, q=q, k=k, fc1=mlp.fc1, act=_torch_activation(mlp.activation_fn),
                                    fc2=mlp.fc2, num_heads=attn.num_attention_heads, options=options)  # fmt: skip
    dropped = {(("attention.v_proj.weight", "attention.v_proj.bias"), "W_V = I"): (attn.v_proj.weight, attn.v_proj.bias),
               (("attention.o_proj.weight", "attention.o_proj.bias"), "W_P = I"): (attn.o_proj.weight, attn.o_proj.bias),
               (("layernorm_after.weight", "layernorm_after.bias"), "one shared pre-norm"): (layer.layernorm_after.weight,
                                                                                              layer.layernorm_after.bias)}  # fmt: skip
    return _wrap(layer, block, report, _encoder_forward, "attention", type(attn), dropped)


@register_converter(GPT2Block)
def _convert_gpt2_block(block: nn.Module, options: SASPConversion) -> tuple[nn.Module, ConversionReport]:
    """GPT-2 blocks (causal): ``X + Attn(ln_1 X)``, ``+ MLP(ln_2 ·)``; Conv1D weights transposed into Linears, and the
    attention's own scale (1/√d, or 1 without ``scale_attn_weights``, ÷ (layer + 1) with
    ``scale_attn_by_inverse_layer_idx``) folded into W_Q, so the logits are inherited exactly."""
    attn, mlp = block.attn, block.mlp
    if getattr(attn, "is_cross_attention", False) or hasattr(block, "crossattention"):
        raise NotImplementedError("GPT-2 blocks with cross-attention are not converted: SAS-P replaces self-attention only")
    dim = attn.embed_dim
    qkv = _linear_from_conv1d(attn.c_attn)
    w, b = qkv.weight.split(dim), qkv.bias.split(dim)
    fold = attn.scaling * attn.head_dim**0.5  # the block's scale over SAS-P's 1/√d
    converted, report = sasp_from_parts(norm=block.ln_1, q=(w[0] * fold, b[0] * fold), k=(w[1], b[1]), fc1=_linear_from_conv1d(mlp.c_fc),
                                        act=_torch_activation(mlp.act), fc2=_linear_from_conv1d(mlp.c_proj), num_heads=attn.num_heads,
                                        causal=True, options=options)  # fmt: skip
    if fold != 1.0:
        for row in report.rows:
            if row["parameter"].startswith("attn.q."):
                row["note"] = (row["note"] + "; " if row["note"] else "") + f"attention scale folded in (×{fold:.4g})"
    dropped = {(("attn.c_attn.weight[v]", "attn.c_attn.bias[v]"), "W_V = I"): (w[2], b[2]),
               (("attn.c_proj.weight", "attn.c_proj.bias"), "W_P = I"): (attn.c_proj.weight, attn.c_proj.bias),
               (("ln_2.weight", "ln_2.bias"), "one shared pre-norm"): (block.ln_2.weight, block.ln_2.bias)}  # fmt: skip
    return _wrap(block, converted, report, _gpt2_forward, "attn", type(attn), dropped, causal=True)


def _refuse_post_ln(layer: nn.Module, options: SASPConversion):
    raise TypeError(
        f"{type(layer).__name__} is a Post-LN block (Norm(X + Attn(X)), then Norm(· + MLP(·))): its norms sit after the skips, so "
        "it has no pre-norm for both branches to share, and without the skips every later layer would read another input. "
        "SAS-P conversion keeps Pre-LN blocks (X + Attn(Norm X)): CLIP, SigLIP, ViT, GPT-2, timm and open_clip transformers"
    )


for _post_ln in POST_LN_LAYERS:
    register_converter(_post_ln)(_refuse_post_ln)


@register_host_fixup(transformers.PreTrainedModel)
def _after_conversion(model: nn.Module) -> None:
    """transformers installs its output-recording hooks once per model, on the layer classes it knows: after blocks
    were replaced, drop them everywhere and let the next forward install them on the converted layers; a converted
    GPT-2 keeps no cache, so it stops asking for one."""
    for module in model.modules():
        recording = [k for k, h in module._forward_hooks.items() if getattr(h, "__name__", "") == "output_capturing_hook"]
        for hooks in (module._forward_hooks, module._forward_hooks_with_kwargs, module._forward_hooks_always_called):
            for key in recording:
                hooks.pop(key, None)
        if isinstance(module, transformers.PreTrainedModel):
            module._output_capturing_hooks_installed = False
    if any(isinstance(m, _HOST_CLASSES.get(GPT2Block, ())) for m in model.modules()) and getattr(model.config, "use_cache", False):
        model.config.use_cache = False


# ── attention readers (divergence) ───────────────────────────────────────────────────────────────────────────────
# Each reads softmax(QKᵀ·scale + M) from the call the host made: the 4-D mask it passed (causal and padding; bool or
# additive), or, with none, the causality the call or the block implies (CLIP's text model says is_causal=True; a text
# layer read on its own is causal by its configuration, a CLIPTextConfig). Queries the mask makes padding are marked
# (siclip.blocks.readers.AttentionRead): SDPA's boolean mask leaves a left-padded query no key, a NaN row.


def _call_mask(args: tuple, kwargs: dict, position: int) -> Tensor | None:
    return args[position] if len(args) > position else kwargs.get("attention_mask")


def _clip_text_layer(layer: nn.Module) -> bool:
    """A CLIP text layer (causal: CLIP's text transformer always masks later tokens) rather than a vision one."""
    return isinstance(getattr(getattr(layer, "self_attn", None), "config", None), transformers.CLIPTextConfig)


@register_attention_reader(CLIPEncoderLayer)
@register_attention_reader(SiglipEncoderLayer)
def _read_clip_layer(layer: nn.Module, args: tuple, kwargs: dict) -> AttentionRead:
    attn, h = layer.self_attn, layer.layer_norm1(args[0])
    return read_softmax(attn.q_proj(h), attn.k_proj(h), attn.num_heads, scale=attn.scale, attn_mask=_call_mask(args, kwargs, 1),
                        causal=bool(kwargs.get("is_causal", _clip_text_layer(layer))))  # fmt: skip


@register_attention_reader(ViTLayer)
def _read_vit_layer(layer: nn.Module, args: tuple, kwargs: dict) -> AttentionRead:
    attn, h = layer.attention, layer.layernorm_before(args[0])
    return read_softmax(attn.q_proj(h), attn.k_proj(h), attn.num_attention_heads, scale=attn.scaling, attn_mask=_call_mask(args, kwargs, 1))


@register_attention_reader(GPT2Block)
def _read_gpt2_block(block: nn.Module, args: tuple, kwargs: dict) -> AttentionRead:
    attn = block.attn
    q, k, _ = attn.c_attn(block.ln_1(args[0])).split(attn.split_size, dim=-1)
    return read_softmax(q, k, attn.num_heads, scale=attn.scaling, attn_mask=_call_mask(args, kwargs, 2), causal=True)


@register_attention_reader(_SASPLayer)
def _read_converted(layer: nn.Module, args: tuple, kwargs: dict) -> AttentionRead:
    """A converted layer: the softmax term of its shaped attention, under the masks it decoded from the call."""
    x, block, gpt2 = args[0], layer.sasp, isinstance(layer, GPT2Block)  # GPT-2's call: (hidden_states, cache, attention_mask, …)
    causal = True if gpt2 else bool(kwargs.get("is_causal", layer.default_causal))
    mask = _call_mask(args, kwargs, 2 if gpt2 else 1)
    _, padding = decode_attention_mask(mask, x.shape[0], x.shape[1], causal)
    h = block.norm(x)
    return read_softmax(block.attn.q(h), block.attn.k(h), block.num_heads, causal=causal, key_padding_mask=padding)


register_block_causality(CLIPEncoderLayer)(_clip_text_layer)
register_block_causality(SiglipEncoderLayer)(lambda layer: False)  # SigLIP's text tower attends both ways
register_block_causality(ViTLayer)(lambda layer: False)
register_block_causality(GPT2Block)(lambda block: True)
register_block_causality(_SASPLayer)(lambda layer: True if isinstance(layer, GPT2Block) else bool(layer.default_causal))


# ── CLIP adapter: teachers and evaluation, preprocessing ─────────────────────────────────────────────────────────
# ── FLIP token masking (siclip.blocks.token_dropout) ─────────────────────────────────────────────────────────────
#
# transformers' vision models have no token-dropout slot: their embeddings (patches + class token + positions) feed
# the pre-norm and the encoder directly. The masker runs on the embeddings' output, through a forward hook, which is
# where open_clip and timm drop tokens (after the positional embedding, before the first block). CLIP's and ViT's
# pooling reads the class token (always kept), SigLIP's attention-pooling head reads whatever tokens remain.


def _drop_tokens_hook(embeddings: nn.Module, args, output: Tensor) -> Tensor:
    return embeddings.token_dropout(output)


def _embeddings_token_dropout(num_prefix_tokens: int):
    def install(embeddings: nn.Module, ratio: float) -> TokenDropout:
        existing = getattr(embeddings, "token_dropout", None)
        if isinstance(existing, TokenDropout):
            existing.ratio = check_ratio(ratio)
            return existing
        embeddings.token_dropout = TokenDropout(ratio, num_prefix_tokens).train(embeddings.training)
        embeddings.register_forward_hook(_drop_tokens_hook)
        return embeddings.token_dropout

    return install


register_token_dropout(transformers.models.clip.modeling_clip.CLIPVisionEmbeddings)(_embeddings_token_dropout(1))
register_token_dropout(transformers.models.vit.modeling_vit.ViTEmbeddings)(_embeddings_token_dropout(1))
register_token_dropout(transformers.models.siglip.modeling_siglip.SiglipVisionEmbeddings)(_embeddings_token_dropout(0))


CLIP_MODELS = {"clip": transformers.CLIPModel, "siglip": transformers.SiglipModel}
_RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL's codes, as image processors store them


def _features(output) -> Tensor:
    """transformers 5 returns a model output whose ``pooler_output`` holds the projected features; 4.x a tensor."""
    return output if isinstance(output, Tensor) else output.pooler_output


class HFTokenizer:
    """A transformers tokenizer with siclip's interface: ``tokenizer(texts) -> (n, context_length)`` ids, padded to
    the context length as the model was trained (``padding="max_length"``; to the longest text when the model has no
    fixed context, GPT-2's), plus ``encode`` for content ids, and :meth:`spec`, its files as plain data."""

    def __init__(self, tokenizer, context_length: int | None) -> None:
        self.tokenizer, self.context_length = tokenizer, context_length
        self.name = f"hf:{type(tokenizer).__name__}"
        self.vocab_size = len(tokenizer)
        self.pad_token_id = tokenizer.pad_token_id
        self.eot_token_id = tokenizer.eos_token_id
        self.sot_token_id = tokenizer.bos_token_id
        self.unk_token_id = tokenizer.unk_token_id
        self.uses_attention_mask = "attention_mask" in tokenizer.model_input_names

    def __call__(self, texts, context_length: int | None = None) -> Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        length = context_length or self.context_length
        return self.tokenizer(texts, padding="max_length" if length else "longest", truncation=length is not None, max_length=length,
                              return_tensors="pt")["input_ids"]  # fmt: skip

    def spec(self) -> dict:
        """What rebuilds this tokenizer with no folder: the files ``save_pretrained`` writes, held as text (a binary
        file, a SentencePiece model, base64 under ``binary_files``: the spec stays JSON), and the context length
        (:func:`tokenizer_from_spec`)."""
        import base64
        import tempfile

        with tempfile.TemporaryDirectory(prefix="siclip-tokenizer-") as folder:
            self.tokenizer.save_pretrained(folder)
            files, binary = {}, {}
            for path in sorted(Path(folder).iterdir()):
                data = path.read_bytes()
                try:
                    files[path.name] = data.decode("utf-8")
                except UnicodeDecodeError:
                    binary[path.name] = base64.b64encode(data).decode("ascii")
        return {"name": "hf", "class": type(self.tokenizer).__name__, "context_length": self.context_length, "files": files,
                "binary_files": binary}  # fmt: skip

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def unknown_words(self, text: str) -> list[str]:
        return [w for w in text.split() if self.unk_token_id in self.encode(w)]

    def attention_mask(self, ids: Tensor) -> Tensor | None:
        """The mask the tokenizer returns with ``ids``: real tokens 1, padding 0 (None when the model takes none).
        When padding reuses the end-of-text token (CLIP's), a sequence ends at its first end-of-text token."""
        if not self.uses_attention_mask:
            return None
        if self.pad_token_id is None or self.pad_token_id == self.eot_token_id:
            ends = (ids == self.eot_token_id).int()
            after = (ends.cumsum(-1) - ends) > 0  # strictly after the first end-of-text token
            return (~after).long()
        return (ids != self.pad_token_id).long()


def tokenizer_from_spec(spec: dict, where: str = "checkpoint") -> HFTokenizer:
    """The tokenizer :meth:`HFTokenizer.spec` described: its files written to a temporary folder and read by
    ``AutoTokenizer`` (local files only; no code from the files is run: their JSON is checked as a model folder's is,
    :func:`siclip.interop.safety.scan_record`, and ``trust_remote_code`` is off), wrapped with its context length."""
    import base64
    import binascii
    import tempfile

    files, binary = spec.get("files"), spec.get("binary_files", {})
    well_formed = isinstance(files, dict) and files and isinstance(binary, dict)
    if not well_formed or not all(isinstance(v, str) for v in (*files.values(), *binary.values())):
        raise ValueError(f"{where}: the saved transformers tokenizer must hold its files (name → text), got {type(files).__name__}")
    context = spec.get("context_length")
    if context is not None and (isinstance(context, bool) or not isinstance(context, int) or not 1 <= context <= MAX_CONTEXT):
        raise UnsafeModel(f"{where}: the saved tokenizer's context_length must be an integer in [1, {MAX_CONTEXT}], got {context!r}")
    with tempfile.TemporaryDirectory(prefix="siclip-tokenizer-") as folder:
        for name, data in [*files.items(), *binary.items()]:
            wrong = data_file_name(name)
            if wrong:
                raise UnsafeModel(f"{where}: the saved tokenizer's file {name!r} {wrong}")
            try:
                content = base64.b64decode(data, validate=True) if name in binary else data.encode("utf-8")
            except binascii.Error:
                raise ValueError(f"{where}: the saved tokenizer's file {name!r} is not base64") from None
            if name.endswith(".json") and name not in binary:
                try:
                    record = json.loads(content)
                except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
                    raise ValueError(f"{where}: the saved tokenizer's {name} is not JSON ({type(err).__name__})") from None
                scan_record(record, f"{where}: tokenizer file {name}", bounded=False)  # names no code of its own
            (Path(folder) / name).write_bytes(content)
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(folder, **LOCAL_ONLY)
        except _LOAD_ERRORS as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise ValueError(f"{where}: the saved transformers tokenizer cannot be rebuilt ({first})") from None
    return HFTokenizer(tokenizer, context)


class HFClip(nn.Module):
    """A transformers ``CLIPModel`` or ``SiglipModel`` with siclip's CLIP interface (``siclip.interop``)."""

    def __init__(self, model: nn.Module, tokenizer: HFTokenizer, preprocess: Preprocess, name: str) -> None:
        super().__init__()
        self.model, self.tokenizer, self.preprocess, self.name = model, tokenizer, preprocess, name
        config = model.config
        self.embed_dim = getattr(config, "projection_dim", None) or config.vision_config.hidden_size

    def encode_image(self, pixels: Tensor) -> Tensor:
        return F.normalize(_features(self.model.get_image_features(pixel_values=pixels)), dim=-1)

    def encode_text(self, ids: Tensor) -> Tensor:
        mask = self.tokenizer.attention_mask(ids)
        return F.normalize(_features(self.model.get_text_features(input_ids=ids, attention_mask=mask)), dim=-1)

    def scale(self) -> Tensor:
        return self.model.logit_scale.exp().reshape(())


def default_preprocess(model: nn.Module) -> Preprocess:
    """The image processor's defaults for ``model`` when no ``preprocessor_config.json`` says otherwise: CLIP's
    (bicubic short side, centre crop, OpenAI's mean and std), SigLIP's (bicubic squash to the input size, mean = std = ½);
    crops start where transformers' processors start them, ``(H − S) // 2``."""
    size = getattr(model.config, "vision_config", model.config).image_size
    if model.config.model_type.startswith("siglip"):
        return Preprocess(size=size, resize_mode="squash", interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3, crop_rounding="floor")
    return Preprocess(size=size, interpolation="bicubic", mean=CLIP_MEAN, std=CLIP_STD, crop_rounding="floor")


def preprocess_from_file(path: Path) -> Preprocess:
    """A ``preprocessor_config.json`` (``CLIPImageProcessor``, ``SiglipImageProcessor``) as siclip's Preprocess, with
    transformers' crop arithmetic (``(H − S) // 2``, :data:`siclip.data.transforms.CROP_ROUNDINGS`)."""
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable image processor configuration ({err})") from None
    size, crop = cfg.get("size", {}), cfg.get("crop_size", {})
    size = {"shortest_edge": size} if isinstance(size, int) else size
    crop = {"height": crop, "width": crop} if isinstance(crop, int) else crop
    if cfg.get("do_rescale", True) and abs(cfg.get("rescale_factor", 1 / 255) - 1 / 255) > 1e-12:
        raise ValueError(f"{path}: rescale_factor {cfg['rescale_factor']} (siclip's views scale pixels by 1/255)")
    if cfg.get("resample", 3) not in _RESAMPLE:
        raise ValueError(f"{path}: resample {cfg.get('resample')} (siclip resizes with bilinear (2) or bicubic (3))")
    if "shortest_edge" in size:
        resize, mode = size["shortest_edge"], "shortest"
    elif size.get("height") == size.get("width") and size.get("height"):
        resize, mode = size["height"], "squash"
    else:
        raise ValueError(f"{path}: size {size} (siclip takes a shortest edge or a square)")
    if cfg.get("do_center_crop", mode == "shortest"):
        if crop.get("height") != crop.get("width") or not crop.get("height"):
            raise ValueError(f"{path}: crop_size {crop} (siclip takes square crops)")
        out = crop["height"]
    else:
        out = resize
    normalize = cfg.get("do_normalize", True)
    return Preprocess(size=out, resize=resize, resize_mode=mode, interpolation=_RESAMPLE[cfg.get("resample", 3)],
                      mean=tuple(cfg.get("image_mean", CLIP_MEAN)) if normalize else (0.0,) * 3,
                      std=tuple(cfg.get("image_std", CLIP_STD)) if normalize else (1.0,) * 3, crop_rounding="floor")  # fmt: skip


def _context_length(model: nn.Module) -> int:
    return model.config.text_config.max_position_embeddings


def adapt(model: nn.Module, tokenizer=None, preprocess: Preprocess | None = None, spec: str | None = None) -> LoadedClip:
    """``model`` (``CLIPModel``/``SiglipModel``) with siclip's interface; ``tokenizer`` a transformers tokenizer."""
    if tokenizer is None:
        raise ValueError(f"a {type(model).__name__} needs its tokenizer: as_clip(model, tokenizer=AutoTokenizer.from_pretrained(DIR))")
    wrapped = tokenizer if isinstance(tokenizer, HFTokenizer) else HFTokenizer(tokenizer, _context_length(model))
    name = getattr(model.config, "_name_or_path", "") or type(model).__name__
    clip = HFClip(model.eval(), wrapped, preprocess or default_preprocess(model), str(name))
    return LoadedClip(clip, wrapped, spec or f"<{type(model).__name__} object>")


for _cls in CLIP_MODELS.values():
    ADAPTERS.register(_cls)(adapt)


# ── loading a folder: local files only, no code of the folder's own (siclip.interop.safety) ────────────────────────
LOCAL_ONLY = {"local_files_only": True, "trust_remote_code": False}
_LOAD_ERRORS = (OSError, ValueError, RuntimeError, KeyError, TypeError, AttributeError)


def check_folder(path: Path, spec: str, *, tokenizer: bool = True, weights: bool = True) -> dict:
    """:func:`siclip.interop.safety.check_model_folder` with the model types this transformers ships."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return check_model_folder(path, spec, known_types=CONFIG_MAPPING.keys(), tokenizer=tokenizer, weights=weights)


def _config(path: Path, spec: str):
    try:
        return transformers.AutoConfig.from_pretrained(path, **LOCAL_ONLY)
    except _LOAD_ERRORS as err:
        raise foreign_failure(f"{spec}: {path / 'config.json'}", err) from None


def _tokenizer(path: Path, spec: str):
    """The tokenizer saved in ``path`` (after the folder's checks; its files must be there)."""
    check_folder(path, spec, weights=False)
    try:
        return transformers.AutoTokenizer.from_pretrained(path, **LOCAL_ONLY)
    except _LOAD_ERRORS as err:
        raise FileNotFoundError(f"{spec}: no usable tokenizer saved in {path} ({str(err).strip().splitlines()[0][:200]}); save it beside the "
                                "model (tokenizer.save_pretrained(DIR))") from None  # fmt: skip


def _pretrained(model_class: type, path: Path, spec: str, config) -> nn.Module:
    """``model_class.from_pretrained`` on a checked folder: its size counted on the meta device and its weights'
    shapes compared with the config before anything is allocated."""
    meta = build_on_meta(lambda: model_class(config), spec)
    check_shapes(meta, weight_shapes(path, spec), f"{spec}: {path}")
    del meta
    try:
        return model_class.from_pretrained(path, config=config, **LOCAL_ONLY).eval()
    except _LOAD_ERRORS as err:
        raise foreign_failure(f"{spec}: {path}", err) from None


def load_spec(directory: str, spec: str) -> LoadedClip:
    """``hf:DIR``: the model, tokenizer and image processor configuration saved in ``DIR`` (nothing downloaded, no
    code of the folder's own run: :mod:`siclip.interop.safety`)."""
    path = Path(directory)
    declared = check_folder(path, spec)
    if declared["model_type"] not in CLIP_MODELS:
        raise ValueError(f"{spec}: a {declared['model_type']!r} model; siclip takes CLIP and SigLIP models ({sorted(CLIP_MODELS)}) as CLIPs")
    processor = path / "preprocessor_config.json"
    if not processor.is_file():
        raise FileNotFoundError(f"{spec}: no preprocessor_config.json in {path}: siclip reads the model's preprocessing from it "
                                "(save the image processor beside the model: processor.save_pretrained(DIR))")  # fmt: skip
    preprocess = preprocess_from_file(processor)
    tokenizer = _tokenizer(path, spec)
    model = _pretrained(CLIP_MODELS[declared["model_type"]], path, spec, _config(path, spec))
    return adapt(model, tokenizer, preprocess, spec)


def load_image_to_text(directory: str | Path, spec: str) -> tuple[nn.Module, object]:
    """``(model, processor)`` of an image-to-text model saved in ``directory`` (BLIP, GIT, BLIP-2, …: a captioner,
    :mod:`siclip.interop.captioners`), through the same checks as every transformers load: the folder's JSON names no
    code and a model type transformers ships, a tokenizer is there, the weights are readable and fit the config, the
    size is counted on the meta device; local files only, no remote code."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES as known

    path = Path(directory)
    declared = check_folder(path, spec)
    if declared["model_type"] not in known:
        raise ValueError(f"{spec}: a {declared['model_type']!r} model is not an image-to-text model transformers knows "
                         f"(BLIP, GIT, BLIP-2, …: {', '.join(sorted(known)[:12])}, …)")  # fmt: skip
    config = _config(path, spec)
    try:
        processor = transformers.AutoProcessor.from_pretrained(path, **LOCAL_ONLY)
        model_class = transformers.AutoModelForImageTextToText._model_mapping[type(config)]
    except (*_LOAD_ERRORS, KeyError) as err:
        raise foreign_failure(f"{spec}: {path}", err) from None
    return _pretrained(model_class, path, spec, config), processor


# ── original models and their architecture (siclip.interop.converted) ────────────────────────────────────────────


def load_pretrained(path: Path, spec: str) -> nn.Module:
    """A transformers model saved in ``path`` (``from_pretrained``, local files only, no remote code): the
    CLIP/SigLIP class for those, else ``AutoModel``'s."""
    declared = check_folder(path, spec, tokenizer=False)
    config = _config(path, spec)
    model_class = CLIP_MODELS.get(declared["model_type"])
    if model_class is None:
        try:
            model_class = transformers.AutoModel._model_mapping[type(config)]
        except (KeyError, ValueError):
            raise ValueError(f"{spec}: transformers has no model class for a {declared['model_type']!r} configuration") from None
    return _pretrained(model_class, path, spec, config)


def load_original(rest: str, spec: str) -> nn.Module:
    return load_pretrained(Path(rest), spec)


def architecture_of(model: nn.Module) -> dict:
    """The class, config and constructor flags that rebuild ``model`` (ViT's and BERT-like models' optional pooler)."""
    init = {"add_pooling_layer": model.pooler is not None} if hasattr(model, "pooler") else {}
    return {"class": type(model).__name__, "config": model.config.to_dict(), "attn_implementation": model.config._attn_implementation,
            "init": init}  # fmt: skip


INIT_FLAGS = ("add_pooling_layer",)


def build_architecture(record: dict, where: str = "architecture record") -> nn.Module:
    """The model a record of :func:`architecture_of` describes, fresh weights; the record is checked first: a
    transformers model class, a config of bounded fields naming no code, a local attention implementation, known
    constructor flags, and a size counted on the meta device."""
    name = record.get("class")
    model_class = getattr(transformers, name, None) if isinstance(name, str) and name.isidentifier() else None
    if not (isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel)):
        raise ValueError(f"{where}: class {name!r} is not a model class of transformers")
    if not isinstance(record.get("config"), dict):
        raise ValueError(f"{where}: config must be an object (a transformers configuration), got {type(record.get('config')).__name__}")
    scan_record(record["config"], where)
    check_attention(record.get("attn_implementation"), f"{where}: attn_implementation")
    init = record.get("init", {})
    if not isinstance(init, dict) or not all(k in INIT_FLAGS and isinstance(v, bool) for k, v in init.items()):
        raise ValueError(f"{where}: init must hold only {list(INIT_FLAGS)} (true or false), got {init!r}")
    try:
        config = model_class.config_class.from_dict(record["config"])
    except _LOAD_ERRORS as err:
        raise foreign_failure(f"{where}: config", err) from None
    config._attn_implementation = record.get("attn_implementation") or "sdpa"
    build_on_meta(lambda: model_class(config, **init), where)
    return model_class(config, **init).eval()


def _directory_preprocess(path: Path, model: nn.Module) -> Preprocess:
    processor = path / "preprocessor_config.json"
    return preprocess_from_file(processor) if processor.is_file() else default_preprocess(model)


def _reads_images(model: nn.Module) -> bool:
    return getattr(getattr(model.config, "vision_config", model.config), "image_size", None) is not None


def _reads_text(model: nn.Module) -> bool:
    return isinstance(model, tuple(CLIP_MODELS.values())) or not _reads_images(model)


def original_tokenizer(model: nn.Module, rest: str) -> HFTokenizer | None:
    """The tokenizer saved beside the model in its directory, for a model that reads text (None for a vision model):
    a CLIP's padded to its context length, any other's to the longest caption."""
    if not _reads_text(model):
        return None
    path = Path(rest)
    tokenizer = _tokenizer(path, f"hf:{rest}")  # the folder checked first (siclip.interop.safety)
    return HFTokenizer(tokenizer, _context_length(model) if isinstance(model, tuple(CLIP_MODELS.values())) else None)


def calibration_run(model: nn.Module, tokenizer: HFTokenizer | None, preprocess: Preprocess | None, captions: list[str] | None,
                    images: list | None):  # fmt: skip
    """``run(m)``: a model of ``model``'s architecture on the calibration inputs, for divergences and FLOPs: a CLIP on
    both (through ``tokenizer`` and ``preprocess``), a vision model on ``images``, a text model on ``captions``. Text
    runs inside :func:`siclip.blocks.real_tokens` with the tokenizer's attention mask, so divergences read the
    captions' tokens, never their padding."""
    from siclip.blocks import real_tokens
    from siclip.data.tokenizer import real_token_mask
    from siclip.data.transforms import preprocess_image

    if isinstance(model, tuple(CLIP_MODELS.values())):
        if not captions or not images:
            raise ValueError("a CLIP's divergences need both calibration captions and calibration images")
        ids, pixels = tokenizer(captions), torch.stack([preprocess_image(im, preprocess) for im in images])
        tokens = real_token_mask(ids, tokenizer)

        def run_clip(m: nn.Module):
            clip = adapt(m, tokenizer, preprocess).model
            with real_tokens(tokens):
                text = clip.encode_text(ids)
            return text, clip.encode_image(pixels)

        return run_clip
    if _reads_images(model):
        if not images:
            raise ValueError(f"a {type(model).__name__} reads images: give calibration images")
        pixels = torch.stack([preprocess_image(im, preprocess) for im in images])
        return lambda m: m(pixel_values=pixels)
    if not captions:
        raise ValueError(f"a {type(model).__name__} reads text: give calibration captions")
    raw = tokenizer.tokenizer
    if raw.pad_token is None:  # GPT-2's tokenizer has none: pad with end-of-text, masked out
        raw.pad_token = raw.eos_token
    inputs = dict(raw(captions, padding=True, truncation=True, return_tensors="pt"))
    if hasattr(model.config, "use_cache"):
        inputs["use_cache"] = False  # a converted GPT-2 keeps no cache

    def run_text(m: nn.Module):
        with real_tokens(inputs["attention_mask"].bool()):
            return m(**inputs)

    return run_text


def original_preprocess(model: nn.Module, rest: str) -> Preprocess | None:
    return _directory_preprocess(Path(rest), model) if _reads_images(model) else None


def adapt_converted(model: nn.Module, tokenizer: HFTokenizer, preprocess: Preprocess, spec: str) -> LoadedClip:
    """A converted CLIP/SigLIP with the tokenizer and preprocessing its file holds."""
    if not isinstance(model, tuple(CLIP_MODELS.values())):
        raise ValueError(f"{spec}: a converted {type(model).__name__} is not a CLIP (CLIPModel or SiglipModel)")
    return adapt(model, tokenizer, preprocess, spec)
