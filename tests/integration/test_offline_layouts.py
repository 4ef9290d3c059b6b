"""The trainer's ``forward`` layouts train exactly like the plain reference layout: same losses per step and
same adapter after a few DPO steps (float32, 1e-5), on LLaVA and Qwen2-VL (mRoPE), live and cached reference;
the default (``auto``) runs the prefix-cache layout there and the packed one on Gemma3, and saves its choice."""

from __future__ import annotations

from collections import Counter

import pytest
from test_offline_train import assert_same_weights, config, make_pairs, metrics, trainable_dir  # noqa: F401

from mmalign.models.layouts import PREFERENCE_LAYOUTS
from mmalign.trainers.offline import train_offline

pytestmark = pytest.mark.integration

STEPS = ("max_steps=3", "loss.sft_weight=0.3", "loss.beta=0.5")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return make_pairs(tmp_path_factory.mktemp("pairs"), n=16, seed=2)


@pytest.fixture
def calls(monkeypatch) -> Counter:
    """Counts the forward calls of each layout, so a test sees which layout the trainer really ran."""
    counter: Counter = Counter()
    for name, (collate, forward) in list(PREFERENCE_LAYOUTS.items()):
        def spy(model, batch, _name=name, _forward=forward):
            counter[_name] += 1
            return _forward(model, batch)
        monkeypatch.setitem(PREFERENCE_LAYOUTS, name, (collate, spy))
    return counter


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_every_layout_trains_like_plain(family, trainable_dir, pairs, tmp_path, calls):  # noqa: F811
    model_dir = trainable_dir(family)
    plain = train_offline(config(model_dir, pairs, tmp_path / "plain", "forward=plain", *STEPS))
    assert calls == {"plain": 2 * 3 * 1}  # policy + reference, 3 steps, 1 micro-batch each
    for layout, runs in (("shared_prefix", "shared_prefix"), ("prefix_cache", "prefix_cache"),
                         ("auto", "prefix_cache")):
        calls.clear()
        out = train_offline(config(model_dir, pairs, tmp_path / layout, f"forward={layout}", *STEPS))
        assert calls == {runs: 6}
        assert f"forward: {runs}\n" in (out / "config.yaml").read_text()  # the resolved layout is recorded
        for a, b in zip(metrics(plain), metrics(out), strict=True):
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), layout
            assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], abs=1e-5), layout
        assert_same_weights(plain / "adapter/adapter_model.safetensors", out / "adapter/adapter_model.safetensors",
                            atol=1e-5)
    assert metrics(plain)[-1]["rewards/margins"] != pytest.approx(0.0, abs=1e-4)  # the runs did move


def test_default_layout_on_gemma3_is_the_packed_one(trainable_dir, pairs, tmp_path, calls, caplog):  # noqa: F811
    with caplog.at_level("INFO", logger="mmalign.models.layouts"):
        out = train_offline(config(trainable_dir("gemma3"), pairs, tmp_path / "run", "max_steps=1"))
    assert calls == {"shared_prefix": 2}
    assert [r.getMessage() for r in caplog.records if "forward: auto" in r.getMessage()] == [
        "forward: auto -> shared_prefix, as the prefix-cache forward would not be exact: gemma3 attends "
        "bidirectionally within image blocks, which a cache cannot split"]
    assert "forward: shared_prefix\n" in (out / "config.yaml").read_text()


def test_cached_reference_in_the_shared_layout_equals_live_plain(trainable_dir, pairs, tmp_path):  # noqa: F811
    model_dir = trainable_dir("llava")
    plain = train_offline(config(model_dir, pairs, tmp_path / "plain", "forward=plain", *STEPS))
    cached = train_offline(config(model_dir, pairs, tmp_path / "cached", "forward=shared_prefix",
                                  f"ref_cache_dir={tmp_path / 'refcache'}", *STEPS))
    for a, b in zip(metrics(plain), metrics(cached), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    assert_same_weights(plain / "adapter/adapter_model.safetensors", cached / "adapter/adapter_model.safetensors",
                        atol=1e-5)
