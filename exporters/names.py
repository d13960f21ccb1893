"""The one place that names tensors and artifact files.

The exporter writes these names into the ONNX graph and the manifest; every runtime reads them
back from the manifest. Nothing else spells them out, so a rename cannot split the two sides.
"""

from __future__ import annotations

# Image tower: preprocessed images in, raw (unnormalized) CLIP image features out.
IMAGE_INPUT = "image"  # [N, 3, H, W] float32, already normalized with the manifest's mean/std
IMAGE_OUTPUT = "features"  # [N, D] float32
BATCH_AXIS = "batch"  # name of the dynamic batch dimension in the ONNX graph

# Text tower (optional): token ids in, raw text features out.
TEXT_INPUT = "tokens"  # [N, context_length] int64
TEXT_OUTPUT = "text_features"  # [N, D] float32

# Files inside an artifact directory.
MANIFEST_FILE = "manifest.json"
IMAGE_ONNX_FILE = "image_encoder.onnx"
TEXT_ONNX_FILE = "text_encoder.onnx"
ENGINE_FILE = "image_encoder.engine"
TIMING_CACHE_FILE = "tensorrt_timing.cache"
TRT_LOG_FILE = "tensorrt_build.log"
GOLDEN_FILE = "golden.npz"  # arrays: inputs [G,3,H,W] float32, features [G,D] float32
CLASS_FEATURES_FILE = "class_features.npz"  # arrays: features [C,D] float32, classes [C] str

SCHEMA = "fedclip-edge/artifact"
SCHEMA_VERSION = 1

PRECISIONS = ("fp32", "fp16", "int8")

# Fused classifier (exporters/fused.py): image encoder + adapter + class text features.
FUSED_KIND = "fused-classifier"  # manifest "kind"; encoder artifacts: none or "image-encoder"
ENCODER_KIND = "image-encoder"
FUSED_ONNX_FILE = "classifier.onnx"
LOGITS_OUTPUT = "logits"  # [N, C] float32: logit_scale * cos(adapted image feature, class text)
PROBS_OUTPUT = "probs"  # [N, C] float32: softmax of logits
FUSED_ENGINE_FILE = "classifier.engine"
# golden.npz of a fused export: inputs [G,3,H,W], logits [G,C], probs [G,C] (torch composition)
