"""The command line: generated help for every command, both override spellings, shorthands, TRL aliases,
hub ids refused with exit code 2, and the docs' tables kept in step with the code."""

import argparse
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import pytest
from PIL import Image

from mmalign.cli.main import build_parser, config_class, main, parse_args
from mmalign.config import ConfigError, flags_to_overrides, load_config
from mmalign.config_docs import REQUIRED, config_template, describe, format_fields
from mmalign.objectives.preference import LOSS_ALIASES, PREFERENCE_LOSSES
from mmalign.trainers.common import PREFERENCE_ALIASES
from mmalign.trainers.offline import OfflineConfig
from mmalign.trainers.sft import SFTConfig

DOCS = Path(__file__).parents[2] / "docs" / "cli.md"
# Lab-internal commands whose nested world settings are documented in docs/lab.md, not per field.
LAB_COMMANDS = {"mmalign.lab.build:LabConfig", "mmalign.recipes.pretrain:PretrainConfig",
                "mmalign.recipes.demo:DemoConfig", "mmalign.recipes.rm_study:RMStudyConfig"}


def _commands() -> dict[str, str]:
    """``"train dpo"`` -> its config spec, for every registered command with a config dataclass."""
    found = {}

    def walk(parser: argparse.ArgumentParser, words: list[str]) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, [*words, name])
        if parser.get_default("config_class"):
            found[" ".join(words)] = parser.get_default("config_class")

    walk(build_parser(), [])
    return found


def test_every_configured_command_documents_every_field():
    commands = _commands()
    assert {"train dpo", "train sft", "train online-dpo", "eval", "serve", "sample bdhs", "sample corrupt",
            "demo"} <= set(commands)
    for command, spec in commands.items():
        undocumented = [d.key for d in describe(config_class(spec)) if not d.doc]
        if spec in LAB_COMMANDS:  # the user-facing top level at least
            undocumented = [k for k in undocumented if "." not in k]
        assert undocumented == [], f"mmalign {command}: add a comment to these fields: {undocumented}"


@pytest.mark.parametrize("command", ["train dpo", "train sft", "eval", "serve", "sample bdhs"])
def test_help_lists_key_type_default_and_doc(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([*command.split(), "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for d in describe(config_class(_commands()[command])):
        assert f"--{d.key} {d.type}" in text
    if command == "train dpo":
        assert re.search(r"--optim\.lr float\n\s+peak learning rate .*\(default: 0\.0001\)", text)
        assert "--learning_rate -> --optim.lr" in text and "--model VALUE -> --model.path VALUE" in text
        assert "global batch per optimizer step" in text  # batch_size semantics stated


def test_help_config_is_a_loadable_template(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "dpo", "--help-config"])
    path = tmp_path / "c.yaml"
    path.write_text(capsys.readouterr().out)
    assert load_config(OfflineConfig, path) == OfflineConfig()
    assert "lr: 0.0001  # float; peak learning rate" in path.read_text()


def test_both_spellings_give_the_same_overrides_in_order():
    assert flags_to_overrides(["--optim.lr", "1e-5", "data.train=x", "--lora.enabled=false", "--resume",
                               "--max-steps", "3", "--run.resume", "model.path=m", "--neg", "-1"]) == [
        "optim.lr=1e-5", "data.train=x", "lora.enabled=false", "resume=true", "max_steps=3", "run.resume=true",
        "model.path=m", "neg=-1"]
    args = parse_args(["train", "dpo", "--config", "c.yaml", "--optim.lr", "1e-5", "loss.beta=0.2"])
    assert args.config == "c.yaml" and args.overrides == ["optim.lr=1e-5", "loss.beta=0.2"]
    a = load_config(OfflineConfig, None, parse_args(["train", "dpo", "--optim.lr", "2e-5", "--lora.enabled",
                                                      "false"]).overrides)
    b = load_config(OfflineConfig, None, ["optim.lr=2e-5", "lora.enabled=false"])
    assert a == b and a.optim.lr == 2e-5


def test_commands_without_a_config_refuse_unknown_options():
    with pytest.raises(SystemExit) as done:
        parse_args(["data", "validate", "x.jsonl", "--bogus", "1"])
    assert done.value.code == 2


def test_model_and_data_shorthands_and_trl_aliases():
    cfg = load_config(OfflineConfig, None, ["model=/m", "model.dtype=bfloat16", "data=p.jsonl", "learning_rate=3e-6",
                                            "loss_type=sigmoid", "gradient_accumulation_steps=2", "report_to=none",
                                            "num_train_epochs=2", "resume=true"])
    assert (cfg.model.path, cfg.model.dtype, cfg.data.train) == ("/m", "bfloat16", "p.jsonl")
    assert (cfg.optim.lr, cfg.loss.name, cfg.optim.grad_accum, cfg.run.report_to) == (3e-6, "dpo", 2, [])
    assert cfg.epochs == 2 and cfg.run.resume
    assert load_config(OfflineConfig, None, ["loss.name=hinge"]).loss.name == "slic"
    sft = load_config(SFTConfig, None, ["model=/m", "data=s.jsonl", "max_steps=5", "learning_rate=1e-4"])
    assert (sft.model.path, sft.data.train, sft.steps, sft.optim.lr) == ("/m", "s.jsonl", 5, 1e-4)


def test_shorthand_in_yaml_keeps_the_sections_other_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  path: /a\n  dtype: bfloat16\n")
    cfg = load_config(OfflineConfig, path, ["model=/b"])
    assert (cfg.model.path, cfg.model.dtype) == ("/b", "bfloat16")


def test_aliases_point_at_real_keys_and_shadow_none():
    for cls in (OfflineConfig, SFTConfig):
        keys = {d.key for d in describe(cls)}
        for alias, target in cls.ALIASES.items():
            assert target in keys, (cls.__name__, alias)
            assert alias not in keys and alias.split(".")[0] not in {k.split(".")[0] for k in keys}, alias
    assert set(LOSS_ALIASES.values()) <= set(PREFERENCE_LOSSES)


def test_docs_tables_match_the_code():
    text = DOCS.read_text()
    for alias, target in PREFERENCE_ALIASES.items():
        assert f"| `{alias}` | `{target}` |" in text, alias
    for alias, name in LOSS_ALIASES.items():
        assert f"`{alias}` | `{name}`" in text
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                 "logps/rejected"):
        assert f"`{name}`" in text


@pytest.mark.parametrize("argv, what", [
    (["train", "dpo", "model=llava-hf/llava-1.5-7b-hf", "data=pairs.jsonl", "report_to=none"], "model"),
    (["train", "sft", "--model", "llava-hf/llava-1.5-7b-hf", "--data", "s.jsonl", "report_to=none"], "model"),
    (["eval", "model=llava-hf/llava-1.5-7b-hf", "lab_dir=.", "pope.file=", "captions.file=x", "report_to=none"],
     "model"),
    (["data", "convert", "--format", "trl", "openbmb/RLAIF-V-Dataset", "out.jsonl"], "source file"),
    (["data", "validate", "openbmb/RLAIF-V-Dataset"], "record file"),
])
def test_hub_ids_are_refused_with_exit_code_2(argv, what, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if argv[0] == "eval":
        (tmp_path / "x").write_text('{"id": "1", "image": "i.png", "prompt": "p", "objects": []}\n')
        (tmp_path / "vocab").mkdir()
        (tmp_path / "vocab" / "synonyms.txt").write_text("circle\n")
        (tmp_path / "bias.json").write_text('{"pairs": []}')
        Image.new("RGB", (8, 8)).save(tmp_path / "i.png")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{what} " in err and "no hub access" in err and "Traceback" not in err


def test_config_docs_come_from_field_comments():
    @dataclass
    class Inner:
        SHORTHAND: ClassVar[str] = "path"

        path: str = ""  # where it is
        # above a field, over
        # two lines
        size: int = 3

    @dataclass
    class Outer:
        ALIASES: ClassVar[dict[str, str]] = {"where": "inner.path"}

        need: str  # a required field
        mode: Literal["a", "b"] = "a"  # pick one
        inner: Inner = field(default_factory=lambda: Inner(size=4))
        extra: list[float] | None = None

    docs = {d.key: d for d in describe(Outer)}
    assert docs["need"].default is REQUIRED and docs["need"].doc == "a required field"
    assert (docs["mode"].type, docs["mode"].doc) == ("'a' | 'b'", "pick one")
    assert (docs["inner.path"].doc, docs["inner.size"].doc) == ("where it is", "above a field, over two lines")
    assert docs["inner.size"].default == 4  # the parent's factory, not the section's own default
    assert (docs["extra"].type, docs["extra"].doc) == ("list[float] | None", "")
    assert "--where -> --inner.path" in format_fields(Outer)
    assert "need: null  # required; str; a required field" in config_template(Outer)
    assert load_config(Outer, None, ["need=x", "where=/p"]).inner == Inner("/p", 4)
    with pytest.raises(ConfigError, match="extra: expected a list"):  # X | None reports X's own error
        load_config(Outer, None, ["need=x", "extra={a: 1}"])
