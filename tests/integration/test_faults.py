"""Faults end to end on the offline trainer: every checkpoint holds a loadable PEFT adapter and the last step is
checkpointed; a damaged newest checkpoint and a torn metrics line do not stop ``--resume`` from ending where an
uninterrupted run ends; a loss that turns non-finite stops the run (exit 1) with finite weights everywhere."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from test_offline_train import assert_same_weights, cli_args, config, make_pairs, metrics

from mmalign.cli.main import main
from mmalign.models.loading import load_vlm
from mmalign.trainers.checkpoints import checkpoints
from mmalign.trainers.offline import train_offline

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return make_pairs(tmp_path_factory.mktemp("pairs"), n=16, seed=2)


def test_every_checkpoint_holds_a_loadable_adapter_and_the_last_step_is_checkpointed(tiny_vlm_dir, pairs, tmp_path):
    model_dir = tiny_vlm_dir("llava")
    out = train_offline(config(model_dir, pairs, tmp_path / "run", "max_steps=3", "run.save_every=2",
                               "run.keep_checkpoints=5"))
    assert [p.name for p in checkpoints(out)] == ["step_00000003", "step_00000002"]
    for folder in checkpoints(out):
        base, _ = load_vlm(model_dir)
        model = PeftModel.from_pretrained(base, folder / "adapter")
        assert any("lora_A" in name for name, _ in model.named_parameters())
        assert (folder / "adapter/processor_config.json").is_file() or (folder / "adapter/tokenizer.json").is_file()
    assert_same_weights(out / "checkpoints/step_00000003/adapter/adapter_model.safetensors",
                        out / "adapter/adapter_model.safetensors", atol=0)


def test_resume_over_a_damaged_newest_checkpoint_and_a_torn_log_matches_uninterrupted(tiny_vlm_dir, pairs, tmp_path):
    model_dir = tiny_vlm_dir("llava")
    settings = ("max_steps=4", "run.save_every=1", "run.keep_checkpoints=3")
    full = train_offline(config(model_dir, pairs, tmp_path / "full", *settings))
    out = tmp_path / "broken"
    train_offline(config(model_dir, pairs, out, "max_steps=4", "run.save_every=1", "run.keep_checkpoints=3"))
    # As a crash might leave it: the newest checkpoint's optimizer cut short, the log's last line torn.
    optimizer = out / "checkpoints/step_00000004/optimizer.bin"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    log = out / "metrics.jsonl"
    log.write_text(log.read_text()[:-25])
    assert main(["train", "dpo", *cli_args(model_dir, pairs, out, *settings, "run.resume=true")]) == 0
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4]  # step 4 redone from the intact step 3
    assert metrics(out)[-1]["loss"] == pytest.approx(metrics(full)[-1]["loss"], abs=1e-6)
    assert_same_weights(full / "adapter/adapter_model.safetensors", out / "adapter/adapter_model.safetensors")


def test_a_loss_that_turns_non_finite_stops_the_run_before_the_update(tiny_vlm_dir, pairs, tmp_path, capsys):
    out = tmp_path / "diverged"
    args = cli_args(tiny_vlm_dir("llava"), pairs, out, "max_steps=6", "run.save_every=1", "run.keep_checkpoints=10",
                    "optim.lr=1e20", "optim.projector_lr=1e20", "optim.max_grad_norm=0")
    assert main(["train", "dpo", *args]) == 1
    err = capsys.readouterr().err
    assert "mmalign train: training stopped: step" in err and "became non-finite" in err
    assert not (out / "adapter").exists()  # no weights written after the failure
    assert checkpoints(out), "the run stopped before any checkpoint: it should diverge after a few updates"
    for folder in checkpoints(out):
        for name, tensor in load_file(str(folder / "adapter/adapter_model.safetensors")).items():
            assert torch.isfinite(tensor).all(), (folder.name, name)
    logged = [m["loss"] for m in metrics(out)]
    assert all(math.isfinite(x) for x in logged) and len(logged) == len(checkpoints(out))
    assert json.loads((out / ".mmalign.lock").read_text() or "{}") == {}  # released on the way out
