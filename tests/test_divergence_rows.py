"""Divergences over the query rows that are tokens (issue 33, rows 2–4), on the libraries' real classes in float64.

A padded position is a query too: its row is whatever the library fills in, and counting it made the reported JS
depend on the context length (calibration captions padded to 32 tokens with 6 real ones: 0.1442 against 0.0526 over
real rows). Each family is checked against a plain float64 reference over the real rows (the library's own
``output_attentions`` or each caption alone), and for causal text against the same captions padded to another length;
GPT-2 with left padding under SDPA (NaN rows for padded queries) gives the eager figures; a block read on its own
applies its own causal mask, or refuses when it cannot know it.
"""

import numpy as np
import pytest
import torch
import transformers

from helpers import randomize_
from siclip.analysis.divergence import attention_probabilities, divergence_report, text_divergences
from siclip.blocks import read_attention, real_tokens

D, H, LAYERS = 32, 4, 3
LENGTHS = [3, 6, 9]  # tokens of each caption, start and end included


def js_reference(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """JS(P ‖ Q) in nats along the last axis, float64, 0·log 0 = 0."""
    m = (p + q) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        kl_p, kl_q = (np.where(a > 0, a * np.log(a / m), 0.0).sum(-1) for a in (p, q))
    return (kl_p + kl_q) / 2


def reference_matrix(probs: list[np.ndarray], real: np.ndarray) -> np.ndarray:
    """The attention reading over real rows: mean over heads of the mean over real (sample, query) rows of JS."""
    n = len(probs)
    out = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            rows_i, rows_j = (probs[k].transpose(0, 2, 1, 3)[real] for k in (i, j))  # (rows, heads, keys)
            out[i, j] = js_reference(rows_i, rows_j).mean(0).mean()
    return out


def pooled_reference(per_caption: list[list[np.ndarray]]) -> np.ndarray:
    """The same mean over every caption's rows, from each caption's own (unpadded, all real) attention."""
    n = len(per_caption[0])
    sums, rows = np.zeros((n, n, H)), 0
    for probs in per_caption:
        for i in range(n):
            for j in range(n):
                sums[i, j] += js_reference(probs[i][0].transpose(1, 0, 2), probs[j][0].transpose(1, 0, 2)).sum(0)
        rows += probs[0].shape[2]
    return (sums / rows).mean(-1)


def padded_ids(lengths: list[int], context: int, *, left: bool = False, vocab: int = 60, eos: int = 63, seed: int = 0):
    """Token ids ``(len(lengths), context)`` (a start token 62, random words, an end token ``eos``), padded with 0 on the
    right (or left), and the attention mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), context, dtype=torch.long)
    mask = torch.zeros(len(lengths), context, dtype=torch.long)
    for row, n in enumerate(lengths):
        tokens = torch.cat([torch.tensor([62]), torch.randint(1, vocab, (n - 2,), generator=g), torch.tensor([eos])])
        where = slice(context - n, context) if left else slice(0, n)
        ids[row, where], mask[row, where] = tokens, 1
    return ids, mask


def clip_text_model(seed: int, attn: str):
    torch.manual_seed(seed)
    cfg = transformers.CLIPTextConfig(vocab_size=64, hidden_size=D, intermediate_size=2 * D, num_hidden_layers=LAYERS, num_attention_heads=H,
                                      max_position_embeddings=16, eos_token_id=63, bos_token_id=62, pad_token_id=0)  # fmt: skip
    cfg._attn_implementation = attn
    return randomize_(transformers.CLIPTextModel(cfg), 0.3).double().eval()


def gpt2_model(seed: int, attn: str):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=D, n_layer=LAYERS, n_head=H, n_positions=16, bos_token_id=62, eos_token_id=63)
    cfg._attn_implementation = attn
    return randomize_(transformers.GPT2Model(cfg), 0.3).double().eval()


def own_attentions(model, ids, mask=None) -> list[np.ndarray]:
    """The library's own per-layer attention probabilities (eager), float64."""
    eager = model.config._attn_implementation
    model.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, output_attentions=True, **({"use_cache": False} if hasattr(model, "h") else {}))
    finally:
        model.config._attn_implementation = eager
    return [a.numpy() for a in out.attentions]


@pytest.mark.parametrize("family", ["clip_text", "gpt2"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_causal_text_counts_real_rows_only_whatever_the_padding(family, attn, seed):
    """Right padding: the reported divergence is the mean over the captions' own rows (each caption alone, unpadded, the
    library's own attentions), the same padded to 16 or to 9 tokens; counting padded rows gives another figure."""
    model = (clip_text_model if family == "clip_text" else gpt2_model)(seed % 1000, attn)
    stack = "encoder.layers" if family == "clip_text" else "h"
    extra = {"use_cache": False} if family == "gpt2" else {}
    reports = {}
    for context in (16, max(LENGTHS)):
        ids, mask = padded_ids(LENGTHS, context, seed=seed)
        reports[context] = divergence_report(model, {"input_ids": ids, "attention_mask": mask, **extra}).groups[stack]
    assert reports[16]["rows"] == reports[9]["rows"] == sum(LENGTHS) and reports[16]["rows_total"] == 16 * len(LENGTHS)
    # the same rows in float32 attention: a different context changes the kernels' reduction order, nothing more
    torch.testing.assert_close(reports[16]["attention"], reports[9]["attention"], rtol=1e-6, atol=1e-9)
    ids, mask = padded_ids(LENGTHS, 16, seed=seed)
    alone = [own_attentions(model, ids[r : r + 1, :n]) for r, n in enumerate(LENGTHS)]
    # transformers' eager attention takes its softmax in float32: agreement to its precision
    np.testing.assert_allclose(reports[16]["attention"].numpy(), pooled_reference(alone), rtol=1e-6, atol=1e-9)
    every_row = reference_matrix(own_attentions(model, ids, mask), np.ones((len(LENGTHS), 16), bool))
    assert np.abs(every_row - reports[16]["attention"].numpy()).max() > 1e-3  # what was reported before: the padding's rows in


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_gpt2_left_padding_under_sdpa_reads_the_eager_figures(attn, seed):
    """Left padding under SDPA left padded queries no key (NaN rows) and divergence_report stopped with "a divergence
    matrix must be symmetric"; now padded rows are not read, and the figures are the library's own eager attentions'
    over the real rows."""
    model = gpt2_model(seed % 1000, attn)
    ids, mask = padded_ids(LENGTHS, 12, left=True, seed=seed)
    group = divergence_report(model, {"input_ids": ids, "attention_mask": mask, "use_cache": False}).groups["h"]
    assert bool(torch.isfinite(group["attention"]).all()) and group["rows"] == sum(LENGTHS)
    expected = reference_matrix(own_attentions(model, ids, mask), mask.bool().numpy())
    np.testing.assert_allclose(group["attention"].numpy(), expected, rtol=1e-6, atol=1e-9)  # eager's softmax runs in float32


def test_open_clip_text_reads_tokens_up_to_the_end_of_text(seed):
    """open_clip's text tower masks later tokens only, so padding is known from the ids: the calibration run marks the
    tokens up to each end-of-text, and a tower with a context of 16 and one of 10 (the same weights) agree, where
    every row counted does not."""
    open_clip = pytest.importorskip("open_clip")
    from siclip.interop.open_clip import OpenClipTokenizer, calibration_run, preprocess_of

    models, reports, every_row = {}, {}, {}
    torch.manual_seed(seed % 1000)
    for context in (16, 10):
        models[context] = open_clip.CLIP(embed_dim=24, vision_cfg=dict(image_size=16, layers=2, width=D, patch_size=8, head_width=D // H),
                                         text_cfg=dict(context_length=context, vocab_size=49408, width=D, heads=H, layers=LAYERS)).eval()  # fmt: skip
    state = randomize_(models[16], 0.3).state_dict()
    models[10].load_state_dict({**state, "positional_embedding": state["positional_embedding"][:10]})  # the same weights
    captions = ["a red circle", "a photo of the cat", "this is a large blue drawing"]
    images = [np.zeros((20, 20, 3), np.uint8), np.full((18, 24, 3), 200, np.uint8)]
    for context, model in models.items():
        tokenizer = OpenClipTokenizer(open_clip.tokenizer.SimpleTokenizer(context_length=context), "SimpleTokenizer")
        run = calibration_run(model, tokenizer, preprocess_of(model), captions, images)
        reports[context] = divergence_report(model, lambda m=model, r=run: r(m)).groups["transformer.resblocks"]
        ids = tokenizer(captions)
        every_row[context] = divergence_report(model, lambda m=model, i=ids: m.encode_text(i)).groups["transformer.resblocks"]["attention"]
    lengths = [len(tokenizer.encode(c)) + 2 for c in captions]
    assert reports[16]["rows"] == reports[10]["rows"] == sum(lengths)
    torch.testing.assert_close(reports[16]["attention"], reports[10]["attention"], rtol=1e-5, atol=1e-7)  # float32 towers
    assert (every_row[16] - every_row[10]).abs().max() > 1e-3


def test_siclip_text_counts_positions_up_to_the_end_of_text(seed):
    """siclip's text encoder attends over its padding (as Apple's does) unless mask_padding: its padded positions are
    still no queries of the caption. Against the blocks' attention read by hand, rows selected by the ids."""
    from siclip.models import create_model

    torch.manual_seed(seed % 1000)
    model = create_model("mobileclip_tiny", text={"layers": 2}, image={"layers": [1, 1, 1, 1]}).eval()
    model.text.double()  # only the text tower runs
    for block in model.text.transformer:
        randomize_(block, 0.3)
    context = model.config.text.context_length
    ids = torch.zeros(3, context, dtype=torch.long)
    for row, n in enumerate(LENGTHS):
        ids[row, :n] = torch.randint(1, 50, (n,))
        ids[row, n - 1] = model.config.text.vocab_size - 1  # end of text: the largest id
    d = text_divergences(model, ids)
    calls = []
    handles = [b.register_forward_hook(lambda m, a, k, o: calls.append((m, a, k)), with_kwargs=True) for b in model.text.transformer]
    with torch.no_grad():
        model.text(ids)
    for h in handles:
        h.remove()
    probs = [read_attention(m, a, k).numpy() for m, a, k in calls]
    real = (torch.arange(context)[None] < torch.tensor(LENGTHS)[:, None]).numpy()
    assert d["rows"] == sum(LENGTHS)
    np.testing.assert_allclose(d["attention"].numpy(), reference_matrix(probs, real), rtol=1e-9, atol=1e-12)
    assert np.abs(reference_matrix(probs, np.ones_like(real)) - d["attention"].numpy()).max() > 1e-4


def test_real_tokens_must_fit_the_calls():
    model = clip_text_model(0, "eager")
    ids, mask = padded_ids(LENGTHS, 9)

    def run():
        with real_tokens(torch.ones(3, 5, dtype=torch.bool)):
            model(input_ids=ids, attention_mask=mask)

    with pytest.raises(ValueError, match=r"real-token mask \(3, 5\) does not fit a block call on 3 sequences of 9 tokens"):
        divergence_report(model, run)


def test_a_block_read_alone_applies_its_own_causal_mask_or_refuses(seed):
    """Row 4: attention_probabilities(layer, x) of a CLIP text layer put 0.134 of its mass on later keys. A block causal
    by itself stays causal; one that cannot tell (an open_clip residual block serves both towers) needs causal=…"""
    text = clip_text_model(seed % 1000, "eager")
    layer = text.encoder.layers[0]
    x = torch.randn(2, 7, D, dtype=torch.float64)
    probs = attention_probabilities(layer, x)
    assert probs.triu(1).abs().max() == 0
    own = read_attention(layer, (x,), {"is_causal": True})
    torch.testing.assert_close(probs, own, rtol=0, atol=1e-12)
    a, h = layer.self_attn, layer.layer_norm1(x)
    q, k = (t.view(2, 7, H, -1).transpose(1, 2) for t in (a.q_proj(h), a.k_proj(h)))
    logits = (q @ k.transpose(-1, -2)) * a.scale
    expected = torch.softmax(logits.masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), float("-inf")), -1)
    torch.testing.assert_close(probs, expected, rtol=0, atol=1e-12)  # a float64 reference
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, 5:] = True
    padded = attention_probabilities(layer, x, padding)
    assert padded[1][..., 5:].abs().max() == 0 and torch.allclose(padded.sum(-1), torch.ones(2, H, 7, dtype=torch.float64))
    vision = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(hidden_size=D, intermediate_size=2 * D, num_hidden_layers=1,
                                                                        num_attention_heads=H, image_size=16, patch_size=8)).double()  # fmt: skip
    assert attention_probabilities(vision.encoder.layers[0], x).triu(1).abs().max() > 0  # a vision layer is not causal
    gpt2 = gpt2_model(0, "eager").h[0]
    with pytest.raises(ValueError, match="attends causally by itself"):
        attention_probabilities(gpt2, x, causal=False)
    open_clip = pytest.importorskip("open_clip")
    block = open_clip.transformer.ResidualAttentionBlock(D, H).double()
    with pytest.raises(ValueError, match="does not say whether it attends causally .* pass causal=True or causal=False"):
        attention_probabilities(block, x)
    causal = attention_probabilities(block, x, causal=True)
    mask = torch.zeros(7, 7, dtype=torch.float64).masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(causal, read_attention(block, (x,), {"attn_mask": mask}), rtol=0, atol=1e-12)


def test_a_clip_model_called_on_captions_and_images_reads_each_tower_as_alone(seed):
    """A CLIPModel called with ``input_ids``, ``attention_mask`` and ``pixel_values`` at once: the tokenizer's mask is
    the text tower's; the image tower's calls (17 tokens) are read whole, as when the images run alone (it raised "the
    real-token mask (3, 16) does not fit a block call on 3 sequences of 17 tokens")."""
    torch.manual_seed(seed % 1000)
    cfg = transformers.CLIPConfig(
        text_config={"vocab_size": 64, "hidden_size": D, "intermediate_size": 2 * D, "num_hidden_layers": LAYERS, "num_attention_heads": H,
                     "max_position_embeddings": 16, "eos_token_id": 63, "bos_token_id": 62, "pad_token_id": 0},
        vision_config={"hidden_size": D, "intermediate_size": 2 * D, "num_hidden_layers": LAYERS, "num_attention_heads": H, "image_size": 16,
                       "patch_size": 4},
        projection_dim=16)  # fmt: skip
    cfg._attn_implementation = "eager"
    model = randomize_(transformers.CLIPModel(cfg), 0.3).double().eval()
    ids, mask = padded_ids(LENGTHS, 16, seed=seed)
    pixels = torch.randn(len(LENGTHS), 3, 16, 16, dtype=torch.float64)
    both = divergence_report(model, {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}).groups
    text = divergence_report(model.text_model, {"input_ids": ids, "attention_mask": mask}).groups["encoder.layers"]
    image = divergence_report(model.vision_model, pixels).groups["encoder.layers"]
    (text_key,) = [k for k in both if k.startswith("text_model")]
    (image_key,) = [k for k in both if k.startswith("vision_model")]
    assert both[text_key]["rows"] == sum(LENGTHS) and both[image_key]["rows"] == len(LENGTHS) * 17
    torch.testing.assert_close(both[text_key]["attention"], text["attention"], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(both[image_key]["attention"], image["attention"], rtol=1e-9, atol=1e-12)
