"""What the probe scripts share: their command line (model directories, ``--threads``) and the
language model's input for a set of images (the projected image features, one row per image
token, with a constant column for a linear readout's bias)."""

import argparse
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from redundancy.micro.microvqa import Example


def arguments(threads: int, n: int = 0) -> argparse.Namespace:
    """``models`` (directories), ``--threads`` (default ``threads``), applied to torch, and with
    ``n``, ``--n`` (how many questions, default ``n``)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--threads", type=int, default=threads)
    if n:
        ap.add_argument("--n", type=int, default=n)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    return args


def load_with_features(path: str, images: Sequence[Example]) -> tuple[Any, Any, np.ndarray]:
    """``(model, processor, x)``: ``x`` is ``[len(images) * image tokens, hidden + 1]``, the
    projected features of each image's tokens in raster order, then a column of ones."""
    model = LlavaForConditionalGeneration.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    pixels = processor.image_processor([e.image for e in images], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        feats = torch.stack(list(model.model.get_image_features(pixel_values=pixels).pooler_output)).float().numpy()
    x = np.concatenate([feats.reshape(-1, feats.shape[-1]), np.ones((feats.shape[0] * feats.shape[1], 1))], 1)
    return model, processor, x
