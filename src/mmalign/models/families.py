"""The one table of supported VLM families: what every module needs to know per ``config.model_type``.

Each row says which config field holds the image placeholder id (``image_tokens``), how the family's own
forward positions and masks tokens (``shared_prefix``: mRoPE positions, bidirectional image blocks, or no
exact shared-prefix forward at all), and whether ``models.tiny`` builds a tiny random model of it (the families
every test and the real-model smoke path run on). A family missing here is refused with a clear error wherever
a rule is needed.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    """What mmalign knows about one ``model_type``.

    ``image_token_field``: config field of the placeholder id the model replaces with image features;
    ``shared_prefix``: the packed shared-prefix forward reproduces the plain one exactly; ``mrope``: 3-axis
    positions from the model's ``get_rope_index`` (Qwen2-VL); ``image_blocks``: image tokens attend
    bidirectionally within their image (Gemma3); ``tiny``: ``models.tiny`` builds it (tested end to end).
    """

    image_token_field: str
    shared_prefix: bool = False
    mrope: bool = False
    image_blocks: bool = False
    tiny: bool = False


FAMILIES: dict[str, Family] = {
    "llava": Family("image_token_index", shared_prefix=True, tiny=True),
    "llava_next": Family("image_token_index", shared_prefix=True, tiny=True),
    "qwen2_vl": Family("image_token_id", shared_prefix=True, mrope=True, tiny=True),
    "qwen2_5_vl": Family("image_token_id", shared_prefix=True, mrope=True, tiny=True),
    "idefics3": Family("image_token_id", shared_prefix=True, tiny=True),
    "gemma3": Family("image_token_index", shared_prefix=True, image_blocks=True, tiny=True),
    # Same placeholder rule as a tested family; not built tiny, so only the image-token rule is claimed.
    "llava_onevision": Family("image_token_index"),
    "smolvlm": Family("image_token_id"),
    "paligemma": Family("image_token_index"),
}

TINY_FAMILIES: tuple[str, ...] = tuple(name for name, fam in FAMILIES.items() if fam.tiny)

