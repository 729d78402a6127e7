"""Small random models of the foreign libraries, saved as their users save them, for the interoperability tests.

The classes are the libraries' own (transformers' ``CLIPModel``/``SiglipModel``, open_clip's ``CLIP``); only the
sizes are small. Tokenizers are built offline: CLIP's byte-level BPE from the merges file siclip ships, written
as the vocab.json/merges.txt a ``CLIPTokenizer`` reads; a word-level fast tokenizer for SigLIP.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

CLIP_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)
WORDS = ["a", "photo", "of", "the", "cat", "dog", "red", "blue", "circle", "square", "small", "large", "digit", "zero", "one",
         "two", "three", "four", "five", "six", "seven", "eight", "nine", "picture", "drawing", "an", "image", "this", "is"]  # fmt: skip


def clip_tokenizer_files(directory: Path) -> None:
    """vocab.json and merges.txt of CLIP's BPE (49,408 tokens), from siclip's packaged merges file."""
    from siclip.data.tokenizer import ClipBpeTokenizer

    bpe = ClipBpeTokenizer()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(bpe.encoder))
    merges = sorted(bpe.ranks, key=bpe.ranks.get)
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")


def word_tokenizer(pad: str = "<pad>", eos: str = "</s>", unk: str = "<unk>"):
    """A transformers fast tokenizer over :data:`WORDS` (SigLIP's own is SentencePiece, which needs a download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {pad: 0, eos: 1, unk: 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single=f"$A {eos}", special_tokens=[(eos, 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=pad, eos_token=eos, unk_token=unk)


def save_hf_clip(directory: Path, kind: str = "clip", seed: int = 0, *, attn_implementation: str = "sdpa") -> Path:
    """A random transformers ``CLIPModel`` or ``SiglipModel`` saved with ``save_pretrained``, its tokenizer and
    ``preprocessor_config.json`` (written as the image processor writes it), in ``directory``."""
    import transformers

    torch.manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    if kind == "clip":
        clip_tokenizer_files(directory)
        tokenizer = transformers.CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"))
        text = transformers.CLIPTextConfig(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                                           bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id, **CLIP_TEXT)  # fmt: skip
        config = transformers.CLIPConfig(text_config=text.to_dict(), vision_config=transformers.CLIPVisionConfig(**VISION).to_dict(),
                                         projection_dim=24)  # fmt: skip
        model = transformers.CLIPModel(config)
        processor = {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": 32},
                     "resample": 3, "do_center_crop": True, "crop_size": {"height": 32, "width": 32}, "do_rescale": True,
                     "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                     "image_std": [0.26862954, 0.26130258, 0.27577711], "do_convert_rgb": True}  # fmt: skip
    elif kind == "siglip":
        tokenizer = word_tokenizer()
        text = transformers.SiglipTextConfig(vocab_size=len(tokenizer), pad_token_id=0, eos_token_id=1, bos_token_id=None, **CLIP_TEXT)
        vision = transformers.SiglipVisionConfig(**VISION)
        model = transformers.SiglipModel(transformers.SiglipConfig(text_config=text.to_dict(), vision_config=vision.to_dict()))
        processor = {"image_processor_type": "SiglipImageProcessor", "do_resize": True, "size": {"height": 32, "width": 32},
                     "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                     "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}  # fmt: skip
    else:
        raise ValueError(f"unknown kind {kind!r}")
    model.config._attn_implementation = attn_implementation
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text(json.dumps(processor))
    return directory


OPEN_CLIP_CONFIG = {"embed_dim": 24, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
                    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}  # fmt: skip


def save_open_clip(directory: Path, name: str = "tiny-clip", seed: int = 0) -> tuple[Path, Path]:
    """``(config JSON, weights file)`` of a random open_clip ``CLIP`` (CLIP's BPE tokenizer, which open_clip ships)."""
    import open_clip

    torch.manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / f"{name}.json"
    config.write_text(json.dumps(OPEN_CLIP_CONFIG))
    model = open_clip.CLIP(**OPEN_CLIP_CONFIG)
    weights = directory / f"{name}.pt"
    torch.save(model.state_dict(), weights)
    return config, weights


CAPTION_WORDS = ["a", "an", "the", "of", "photo", "picture", "red", "blue", "green", "yellow", "circle", "square", "triangle", "star",
                 "small", "large", "on", "and", "with"]  # fmt: skip


def save_hf_blip(directory: Path, seed: int = 0) -> Path:
    """A random transformers ``BlipForConditionalGeneration`` saved with its ``BlipProcessor`` (a BERT word-piece
    tokenizer over :data:`CAPTION_WORDS`, written offline, and BLIP's image processor at 32 px)."""
    import transformers

    torch.manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *CAPTION_WORDS]) + "\n")
    tokenizer = transformers.BertTokenizer(str(directory / "vocab.txt"), bos_token="[DEC]")
    text = transformers.BlipTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, max_position_embeddings=32, encoder_hidden_size=32,
                                       bos_token_id=tokenizer.bos_token_id, sep_token_id=tokenizer.sep_token_id,
                                       eos_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    vision = transformers.BlipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                                           patch_size=8)  # fmt: skip
    model = transformers.BlipForConditionalGeneration(transformers.BlipConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                                                              projection_dim=16))  # fmt: skip
    image_processor = transformers.BlipImageProcessor(size={"height": 32, "width": 32})
    model.save_pretrained(directory)
    transformers.BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)
    return directory


COCA_CONFIG = {"embed_dim": 32, "custom_text": True,  # CoCa needs the embedding width = the decoder width
               "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16, "attentional_pool": True,
                              "attn_pooler_heads": 2, "attn_pooler_queries": 9, "output_tokens": True},
               "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1, "embed_cls": True,
                            "output_tokens": True},
               "multimodal_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1, "attn_pooler_heads": 2}}  # fmt: skip


def save_open_clip_coca(directory: Path, seed: int = 0) -> tuple[Path, Path]:
    """``(config JSON, weights file)`` of a random open_clip ``CoCa`` (architecture ``coca_tiny``, CLIP's BPE)."""
    import open_clip

    torch.manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "coca_tiny.json"
    config.write_text(json.dumps(COCA_CONFIG))
    model = open_clip.CoCa(**{k: v for k, v in COCA_CONFIG.items() if k != "custom_text"})
    # open_clip leaves the decoder's text_projection as torch.empty (pretrained weights fill it; its init_parameters fails)
    torch.nn.init.normal_(model.text_decoder.text_projection, std=COCA_CONFIG["multimodal_cfg"]["width"] ** -0.5)
    weights = directory / "coca_tiny.pt"
    torch.save(model.state_dict(), weights)
    return config, weights
