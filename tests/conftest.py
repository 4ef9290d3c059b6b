"""Shared fixtures: tiny VLMs of every family, built once per session and handed out as fresh copies."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The default suite is the CPU suite, also on a machine with a GPU: its resume, parity and multi-process tests
# assert bit-equal results, which GPU kernels do not promise (benchmarks/gpu_check.sh checks the GPU path).
# MMALIGN_TEST_DEVICE=cuda leaves the GPU visible.
if os.environ.get("MMALIGN_TEST_DEVICE", "cpu") != "cuda":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

from mmalign.models.tiny import build_tiny_vlm  # noqa: E402
from transformers.utils import is_torchvision_available  # noqa: E402

# Tiny Qwen models carry an image-only processor; reloading a saved one goes through AutoProcessor, which
# builds the full Qwen-VL processor, whose video half needs torchvision in transformers 5.
NEEDS_TORCHVISION_TO_RELOAD = {"qwen2_vl", "qwen2_5_vl"}


def _skip_without_reload(family: str) -> None:
    if family in NEEDS_TORCHVISION_TO_RELOAD and not is_torchvision_available():
        pytest.skip(f"reloading a saved {family} processor needs torchvision, which is not importable here")


@pytest.fixture(scope="session")
def tiny_vlm() -> Callable[..., tuple[Any, Any]]:
    """``tiny_vlm(family, seed=0) -> (model, processor)``: a deep copy of a session-cached tiny VLM.

    The model copy is yours to train or modify; the processor is shared, so do not mutate it.
    """
    cache: dict[tuple[str, int], tuple[Any, Any]] = {}

    def get(family: str, seed: int = 0) -> tuple[Any, Any]:
        if (family, seed) not in cache:
            cache[(family, seed)] = build_tiny_vlm(family, seed)
        model, processor = cache[(family, seed)]
        return copy.deepcopy(model), processor

    return get


@pytest.fixture(scope="session")
def tiny_vlm_dir(tiny_vlm, tmp_path_factory) -> Callable[..., Path]:
    """``tiny_vlm_dir(family, seed=0) -> Path``: the tiny VLM saved with ``save_pretrained`` (model + processor),
    loadable with ``mmalign.models.loading.load_vlm``; written once per session, treat it as read-only.
    Families whose saved processor cannot be reloaded in this environment are skipped with the reason."""
    cache: dict[tuple[str, int], Path] = {}

    def get(family: str, seed: int = 0) -> Path:
        _skip_without_reload(family)
        if (family, seed) not in cache:
            model, processor = tiny_vlm(family, seed)
            path = tmp_path_factory.mktemp(f"tiny_{family}_{seed}")
            model.save_pretrained(path)
            processor.save_pretrained(path)
            cache[(family, seed)] = path
        return cache[(family, seed)]

    return get


@pytest.fixture(scope="session")
def image_sensitive() -> Callable[[Any], Any]:
    """``image_sensitive(model) -> model``: Gemma3's projector weight starts at zero, so a random tiny Gemma3
    ignores its image; give such zero-initialised matrices random values (in place) so that the image matters
    and masking it has something to remove."""

    def fix(model: Any) -> Any:
        import torch

        with torch.no_grad():
            for param in model.parameters():
                if param.dim() == 2 and not param.any():
                    param.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(0))
        return model

    return fix
