"""Datasets: the synthetic PACS stand-in, the ImageFolder-layout loader, the 60/20/20 split."""

from fedclip_edge.data.folder import (
    IMAGE_EXTENSIONS,
    DomainDataset,
    ImageRecord,
    load_image,
    scan_dataset,
)
from fedclip_edge.data.split import split_indices
from fedclip_edge.data.synth import (
    CLASSES,
    DOMAINS,
    caption,
    render,
    sample_batch,
    write_dataset,
)

__all__ = [
    "CLASSES",
    "DOMAINS",
    "IMAGE_EXTENSIONS",
    "DomainDataset",
    "ImageRecord",
    "caption",
    "load_image",
    "render",
    "sample_batch",
    "scan_dataset",
    "split_indices",
    "write_dataset",
]
