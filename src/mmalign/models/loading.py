"""Load a vision-language model and its processor from a local directory; split its parameters by role.

Every stage loads policies and references through ``load_vlm``: ``AutoModelForImageTextToText`` +
``AutoProcessor`` with ``local_files_only`` so nothing is ever fetched from a hub. The parameter helpers
find the vision tower and the vision-to-language projector from the module tree (by the attribute names the
supported architectures use), so trainers can freeze the tower and give the projector its own learning rate
(LLaVA-1.5 recipe) without knowing the architecture.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

from mmalign.config import ConfigError
from mmalign.data.io import local_path

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Module attribute names, across LLaVA(-NeXT/-OneVision), Qwen2(.5)-VL, Idefics3/SmolVLM, Gemma3, PaliGemma.
VISION_MODULES = frozenset({"vision_tower", "visual", "vision_model"})
# Projectors; Qwen's ``merger`` sits inside ``visual`` and LLaVA-NeXT's learnt row separator is a bare parameter.
PROJECTOR_MODULES = frozenset({"multi_modal_projector", "merger", "connector", "image_newline"})


def load_vlm(
    path: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
) -> tuple[Any, Any]:
    """Load ``(model, processor)`` from a local directory written by ``save_pretrained``.

    Args:
        path: directory holding config.json, weights and the processor files.
        dtype: "float32" / "bfloat16" / "float16" / "auto" (the checkpoint's own dtype) or a torch dtype;
            None keeps transformers' default (float32).
        device: where to move the model; None leaves it on CPU for the caller (e.g. an Accelerator) to place.
        trust_remote_code: allow model code shipped inside the directory.
    Returns:
        the model in eval mode and its processor.
    """
    path = local_path(path, "model")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"model {str(path)!r}: " + ("not a model directory (no config.json)" if path.is_dir()
                                                     else "no such directory"))
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES and not trust_remote_code:
        raise ConfigError(f"{path}: model_type {model_type!r} is not an image-text-to-text (VLM) architecture")
    torch_dtype = _resolve_dtype(dtype, path)
    model = AutoModelForImageTextToText.from_pretrained(
        path, dtype=torch_dtype, local_files_only=True, trust_remote_code=trust_remote_code,
    )
    processor = AutoProcessor.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    if device is not None:
        model = model.to(device)
    logger.info("loaded %s (%s) from %s", type(model).__name__, model.dtype, path)
    return model.eval(), processor


def _resolve_dtype(dtype: str | torch.dtype | None, path: Path) -> str | torch.dtype | None:
    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"{path}: unknown dtype {dtype!r}; use one of {', '.join([*DTYPES, 'auto'])}")
    return DTYPES[dtype]


def _names_under(model: torch.nn.Module, modules: frozenset[str], exclude: frozenset[str]) -> list[str]:
    names = []
    for name, _ in model.named_parameters():
        parts = name.split(".")
        if modules.intersection(parts) and not exclude.intersection(parts):
            names.append(name)
    return names


def projector_param_names(model: torch.nn.Module) -> list[str]:
    """Names of the vision-to-language projector's parameters (incl. LLaVA-NeXT ``image_newline``)."""
    names = _names_under(model, PROJECTOR_MODULES, frozenset())
    if not names:
        raise ValueError(f"{type(model).__name__}: no projector module ({', '.join(sorted(PROJECTOR_MODULES))})")
    return names


def vision_param_names(model: torch.nn.Module) -> list[str]:
    """Names of the vision tower's parameters, the projector excluded (Qwen's merger lives inside ``visual``)."""
    names = _names_under(model, VISION_MODULES, PROJECTOR_MODULES)
    if not names:
        raise ValueError(f"{type(model).__name__}: no vision tower module ({', '.join(sorted(VISION_MODULES))})")
    return names


def freeze_vision_tower(model: torch.nn.Module) -> int:
    """Set ``requires_grad=False`` on every vision-tower parameter; returns how many tensors were frozen."""
    frozen = set(vision_param_names(model))
    for name, param in model.named_parameters():
        if name in frozen:
            param.requires_grad_(False)
    return len(frozen)
