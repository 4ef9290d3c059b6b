"""Where the image tokens sit in a tokenized multimodal sequence, per architecture.

Every supported VLM expands each image into a run of placeholder tokens whose input embeddings the model
overwrites with projected image features. Wrapper tokens around those runs (Idefics3's
``<fake_token_around_image>`` / ``<global-img>`` / ``<row_i_col_j>``, Gemma3's ``<start_of_image>`` /
``<end_of_image>``, Qwen's ``<|vision_start|>`` / ``<|vision_end|>``) are ordinary text embeddings and are not
image positions. BDHS (arXiv 2502.01419, Alg. 1) masks attention to exactly these positions.
"""

from __future__ import annotations

from typing import Any

import torch

from mmalign.models.families import FAMILIES

def image_token_id(config: Any) -> int:
    """Id of the placeholder token whose embedding is replaced by image features (top-level VLM config)."""
    row = FAMILIES.get(config.model_type)
    if row is None:
        raise ValueError(f"no image-token rule for model_type {config.model_type!r}; supported: {', '.join(FAMILIES)}")
    return int(getattr(config, row.image_token_field))


def image_token_mask(config: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """Boolean mask of image-feature positions.

    Args:
        config: the VLM's top-level config (``model.config``).
        input_ids: ``[B, T]`` token ids after the processor expanded each image into its placeholders.
    Returns:
        ``bool[B, T]``, True where the model substitutes an image feature vector; its sum equals the number of
        image feature vectors the vision tower + projector produce for the batch.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
    return input_ids == image_token_id(config)
