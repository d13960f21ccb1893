"""Model loading (open_clip tags, checkpoint files, random init) and the offline default."""

from fedclip_edge.models.load import (
    DEFAULT_MODEL,
    NONE_TAG,
    SYNTH_TAG,
    LoadedModel,
    cache_dir,
    encode_images,
    encode_prompts,
    list_architectures,
    load_model,
    state_sha256,
)

__all__ = [
    "DEFAULT_MODEL",
    "NONE_TAG",
    "SYNTH_TAG",
    "LoadedModel",
    "cache_dir",
    "encode_images",
    "encode_prompts",
    "list_architectures",
    "load_model",
    "state_sha256",
]
