"""Exact resume: a run SIGKILLed at a random step and resumed ends where an uninterrupted run ends (with the
POVID slot on, whose noise is seeded per record); and
2 CPU processes (gloo, ``python -m mmalign.cpu_launch 2``) train the same as 1 process with the same global batch."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from test_offline_train import assert_same_weights, cli_args, config, make_pairs, metrics

from mmalign.trainers.checkpoints import latest_checkpoint
from mmalign.trainers.offline import train_offline

pytestmark = pytest.mark.integration

STEPS = 8


def _train_cmd(*args: str) -> list[str]:
    return ["-m", "mmalign.cli.main", "train", "dpo", *args]


def _env() -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return make_pairs(tmp_path_factory.mktemp("pairs"), n=16, seed=1)


def test_sigkill_at_random_step_then_resume_matches_uninterrupted(tiny_vlm_dir, pairs, tmp_path):
    model_dir = tiny_vlm_dir("llava")
    settings = (f"max_steps={STEPS}", "loss.sft_weight=0.2", "povid.enabled=true")
    full = train_offline(config(model_dir, pairs, tmp_path / "full", *settings))
    kill_after = random.randint(2, STEPS - 2)
    out = tmp_path / "killed"
    cmd = [sys.executable, *_train_cmd(*cli_args(model_dir, pairs, out, *settings, "run.save_every=1"))]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log = out / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if log.exists() and len(log.read_text().splitlines()) >= kill_after:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"run ended before the kill at step {kill_after}: " \
                                               f"{proc.stderr.read().decode()[-2000:]}"
    assert not (out / "adapter").exists()
    checkpoint = latest_checkpoint(out)
    assert checkpoint is not None  # the resumed run continues from a checkpoint, not from scratch
    saved = load_file(str(checkpoint / "model.safetensors"))
    assert saved and all("lora_" in k or "modules_to_save" in k for k in saved)  # no frozen base weights
    from mmalign.cli.main import main

    assert main(["train", "dpo", "--resume", *cli_args(model_dir, pairs, out, *settings, "run.save_every=1")]) == 0
    resumed = out
    ends, resumed_log = metrics(full), metrics(resumed)
    assert [m["step"] for m in resumed_log] == list(range(1, STEPS + 1))  # each step logged exactly once
    assert resumed_log[-1]["loss"] == pytest.approx(ends[-1]["loss"], abs=1e-6), f"killed after step {kill_after}"
    assert_same_weights(full / "adapter/adapter_model.safetensors", resumed / "adapter/adapter_model.safetensors")


def test_two_cpu_processes_equal_one_process(tiny_vlm_dir, pairs, tmp_path):
    model_dir = tiny_vlm_dir("llava")
    extra = ("max_steps=3", "loss.name=slic", "loss.beta=0.5", "optim.grad_accum=2")
    one = train_offline(config(model_dir, pairs, tmp_path / "one", *extra))
    two = tmp_path / "two"
    # `accelerate launch --cpu --num_processes 2` starts ONE process on a machine without MPI; the CPU launcher
    # starts two processes in one gloo group, which the final checkpoint records.
    launch = [sys.executable, "-m", "mmalign.cpu_launch", "2", "train", "dpo"]
    done = subprocess.run([*launch, *cli_args(model_dir, pairs, two, *extra, "run.save_every=3")], env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    final = two / "checkpoints/step_00000003"
    assert json.loads((final / "trainer_state.json").read_text())["num_processes"] == 2
    assert {p.name for p in final.glob("rng_*.json")} == {"rng_0.json", "rng_1.json"}
    for a, b in zip(metrics(one), metrics(two), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
        assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], abs=1e-6)
    assert metrics(two)[-1]["rewards/margins"] != 0.0
    assert_same_weights(one / "adapter/adapter_model.safetensors", two / "adapter/adapter_model.safetensors",
                        atol=1e-5)
    assert json.loads((two / "data_fingerprint.json").read_text()) == json.loads(
        (one / "data_fingerprint.json").read_text())
