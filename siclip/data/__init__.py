"""Image–text data: the embedded procedural world, WebDataset and CSV readers, resumable loading.

Every format is a :class:`~siclip.data.sources.Source` (random access to raw samples); an
:class:`ImageTextDataset` turns one into training samples (caption mixing, seeded augmentation,
tokenisation, optional teacher embeddings) and an :class:`ImageTextLoader` batches it with exact
mid-epoch resume.
"""

from .captions import RawCaptionConfig, zero_shot_classes
from .dataset import ImageTextDataset, Skipped, choose_caption, collate_samples
from .embedded import EmbeddedConfig, EmbeddedSource, open_source, retrieval_set, zero_shot_prompts
from .loader import EpochSampler, ImageTextLoader, SkipReport, TooManySkipped
from .sources import RawSample, SampleError, Source, decode_image, encode_image
from .tabular import CsvSource
from .teacher_cache import TeacherCache, TeacherCacheWriter, build_teacher_cache
from .tokenizer import ClipBpeTokenizer, WordTokenizer, build_word_vocabulary, create_tokenizer, tokenizer_spec, unknown_token_rate
from .augment import ColourConfig, eda, names_a_side
from .transforms import AUGMENT_POLICIES, AugmentConfig, Preprocess, augment, augment_policy, model_pixels, normalize_images, preprocess_image
from .captioning import CaptionSettings, caption_table, recaption_shards
from .webdataset import ShardSource, expand_shards, write_shards
from .world import Scene, render_scene, sample_scene

__all__ = [
    "AUGMENT_POLICIES", "AugmentConfig", "CaptionSettings", "ColourConfig", "augment_policy", "eda", "names_a_side", "ClipBpeTokenizer", "CsvSource", "EmbeddedConfig", "EmbeddedSource", "EpochSampler",
    "ImageTextDataset", "ImageTextLoader", "RawCaptionConfig", "RawSample", "SampleError", "Scene", "ShardSource",
    "SkipReport", "Skipped", "Source", "TeacherCache", "TeacherCacheWriter", "TooManySkipped", "WordTokenizer", "augment", "normalize_images",
    "Preprocess", "model_pixels", "preprocess_image",
    "build_teacher_cache", "build_word_vocabulary", "caption_table", "choose_caption", "collate_samples", "create_tokenizer", "decode_image", "encode_image",
    "expand_shards", "open_source", "recaption_shards", "render_scene", "retrieval_set", "sample_scene", "tokenizer_spec", "unknown_token_rate", "write_shards",
    "zero_shot_classes", "zero_shot_prompts",
]  # fmt: skip
