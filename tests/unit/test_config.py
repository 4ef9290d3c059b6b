from dataclasses import dataclass, field
import json
from pathlib import Path
from typing import Literal

import pytest
import yaml

from mmalign.config import ConfigError, config_hash, load_config, save_config
from mmalign.trainers.offline import OfflineConfig
from mmalign.trainers.online import OnlineConfig

CONFIGS = Path(__file__).parents[2] / "configs"
SHIPPED_BASE = Path(__file__).parents[2] / "src" / "mmalign" / "recipes" / "assets" / "base"


@dataclass
class Optim:
    lr: float = 1e-4
    schedule: Literal["cosine", "constant"] = "cosine"


@dataclass
class Recipe:
    name: str = "x"
    steps: int = 10
    splits: list[str] = field(default_factory=lambda: ["a"])
    projector_lr: float | None = None
    optim: Optim = field(default_factory=Optim)


def test_yaml_then_overrides_with_nested_defaults_kept(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"steps": 3, "optim": {"schedule": "constant"}}))
    cfg = load_config(Recipe, path, ["optim.lr=2e-5", "splits=[p, q]", "projector_lr=1"])
    assert cfg.steps == 3 and cfg.optim.schedule == "constant" and cfg.optim.lr == 2e-5
    assert cfg.splits == ["p", "q"] and cfg.projector_lr == 1.0 and isinstance(cfg.projector_lr, float)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.lrr=1"], "unknown key(s) ['lrr']"),
        (["stepz=1"], "unknown key(s) ['stepz']"),
        (["steps=many"], "steps: expected int"),
        (["optim.schedule=linear"], "'linear' is not one of"),
        (["steps"], "not of the form key.sub=value"),
        (["steps=true"], "steps: expected int"),
    ],
)
def test_bad_overrides_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(Recipe, None, overrides)
    assert message in str(err.value)


def test_yes_and_no_are_strings_true_and_false_are_booleans(tmp_path):
    @dataclass
    class Run:
        mixed_precision: Literal["no", "bf16"] = "bf16"
        resume: bool = False

    path = tmp_path / "r.yaml"
    path.write_text("mixed_precision: no\nresume: true\n")
    assert load_config(Run, path) == Run("no", True)
    assert load_config(Run, None, ["mixed_precision=no", "resume=false"]) == Run("no", False)
    with pytest.raises(ConfigError, match="resume: expected bool, got 'yes'"):
        load_config(Run, None, ["resume=yes"])


def test_saved_config_reloads_identically(tmp_path):
    cfg = load_config(Recipe, None, ["steps=7", "optim.lr=0.5"])
    path = save_config(cfg, tmp_path)
    assert path.read_text().startswith(f"# config_hash: {config_hash(cfg)}")
    again = load_config(Recipe, path)
    assert again == cfg and config_hash(again) == config_hash(cfg)
    assert config_hash(load_config(Recipe, None, ["steps=8"])) != config_hash(cfg)


@pytest.mark.parametrize("recipe, name", [(OfflineConfig, "lab_dpo.yaml"), (OnlineConfig, "lab_online.yaml"),
                                          (OnlineConfig, "lab_mixed.yaml"), (OnlineConfig, "lab_online_noisy.yaml")])
def test_shipped_preference_configs_load_and_reload(recipe, name, tmp_path):
    cfg = load_config(recipe, CONFIGS / name)
    assert cfg.model.freeze_vision and cfg.batch_size == 16  # the shared sections and schedule stay top-level keys
    assert load_config(recipe, save_config(cfg, tmp_path)) == cfg


def _max_lengths(node, where=""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from ([(f"{where}{key}", value)] if key == "max_length" else _max_lengths(value, f"{where}{key}."))


def test_lab_configs_leave_room_for_the_shipped_base_image_tokens():
    """The shipped lab base puts 256 image tokens before every prompt; a lab caption + prompt takes < 64 more (a
    max_length below that refuses every record, as the configs written for the 64-token base did)."""
    from mmalign.recipes.rm_study import RMStudyConfig

    image_tokens = json.loads((SHIPPED_BASE / "config.json").read_text())["image_seq_length"]
    lengths = [(f"{path.name}:{key}", value) for path in sorted(CONFIGS.glob("lab*.yaml"))
               for key, value in _max_lengths(yaml.safe_load(path.read_text()))]
    study = RMStudyConfig()
    lengths += [("rm_study rm", study.rm.data.max_length), ("rm_study dpo", study.dpo.data.max_length)]
    assert len(lengths) >= 10 and image_tokens == 256
    assert [name for name, value in lengths if value < image_tokens + 64] == []
    assert study.bdhs.max_answer_tokens + image_tokens + 64 <= 384  # BDHS's up-front check against the context


@pytest.mark.parametrize("recipe", [OfflineConfig, OnlineConfig])
def test_lora_with_a_trainable_vision_tower_is_refused_by_every_preference_recipe(recipe):
    with pytest.raises(ValueError, match="freeze_vision"):
        load_config(recipe, None, ["model.freeze_vision=false"])
    assert not load_config(recipe, None, ["model.freeze_vision=false", "lora.enabled=false"]).model.freeze_vision
