"""``forward: auto``: the prefix-cache layout on every family where it is exact, else the packed one, said once."""

from __future__ import annotations

import logging

import pytest

from mmalign.models.layouts import PREFERENCE_LAYOUTS, resolve_layout

EXACT_WITH_CACHE = ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "idefics3"]


@pytest.mark.parametrize("family", EXACT_WITH_CACHE)
def test_auto_takes_the_prefix_cache_where_it_is_exact(tiny_vlm, family, caplog):
    model, _ = tiny_vlm(family)
    with caplog.at_level(logging.INFO, logger="mmalign.models.layouts"):
        assert resolve_layout("auto", model, max_length=512) == "prefix_cache"
    assert [r.getMessage() for r in caplog.records] == ["forward: auto -> prefix_cache"]


def _fallback(model, caplog, **kwargs) -> str:
    """The one INFO line of a fallback to the packed layout."""
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mmalign.models.layouts"):
        assert resolve_layout("auto", model, **kwargs) == "shared_prefix"
    (record,) = caplog.records
    assert record.levelno == logging.INFO and record.getMessage().startswith("forward: auto -> shared_prefix")
    return record.getMessage()


def test_auto_falls_back_to_the_packed_layout_and_says_why(tiny_vlm, caplog):
    gemma, _ = tiny_vlm("gemma3")  # image blocks (and 64-token sliding windows)
    assert "image blocks" in _fallback(gemma, caplog, max_length=16)
    # Mistral-style window (tiny llava_next: 4096) shorter than prompt width + answer width (< 2 x max_length)
    mistral, _ = tiny_vlm("llava_next")
    assert resolve_layout("auto", mistral, max_length=2048) == "prefix_cache"
    assert "sliding window shorter than the rows (4096 < 4098" in _fallback(mistral, caplog, max_length=2049)
    llava, _ = tiny_vlm("llava")
    assert "activation checkpointing" in _fallback(llava, caplog, max_length=512, activation_checkpointing=True)
    llava.activation_checkpointing_enable()
    assert "activation checkpointing" in _fallback(llava, caplog, max_length=512)


def test_named_layouts_stay_and_unsupported_families_raise(tiny_vlm):
    gemma, _ = tiny_vlm("gemma3")
    for name in PREFERENCE_LAYOUTS:  # a named layout is taken as is; prefix_cache itself refuses Gemma3 later
        assert resolve_layout(name, gemma, max_length=512) == name
    model, _ = tiny_vlm("llava")
    model.config.model_type = "paligemma"
    with pytest.raises(ValueError, match="use forward: plain"):
        resolve_layout("auto", model, max_length=512)


def test_trainers_see_fsdp_activation_checkpointing(tiny_vlm):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from mmalign.trainers.common import trainer_layout

    model, _ = tiny_vlm("llava")
    for checkpointing, layout in ((False, "prefix_cache"), (True, "shared_prefix")):
        fsdp = SimpleNamespace(distributed_type=DistributedType.FSDP,
                               state=SimpleNamespace(fsdp_plugin=SimpleNamespace(activation_checkpointing=checkpointing)))
        assert trainer_layout("auto", model, 512, fsdp) == layout
    assert trainer_layout("auto", model, 512, SimpleNamespace(distributed_type=DistributedType.NO)) == "prefix_cache"
