"""One run per output folder (live holder named, dead holder taken over) and the launch check."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from mmalign.config import ConfigError, load_config
from mmalign.runs import LOCK_FILE, BrokenLaunch, FolderInUse, check_backend, check_world_size, claim_folder
from mmalign.trainers.offline import OfflineConfig, train_offline
from mmalign.trainers.online import OnlineConfig, train_online
from mmalign.trainers.ppo import PPOConfig, train_ppo
from mmalign.trainers.reward_model import RewardModelConfig, train_reward_model
from mmalign.trainers.rloo import RLOOConfig, train_rloo
from mmalign.trainers.sft import SFTConfig, train_sft
from mmalign.trainers.tagging import TaggingConfig, train_tagging


def _holder(folder):
    """A process holding ``folder``'s lock until killed."""
    proc = subprocess.Popen([sys.executable, "-c", (
        "import time\nfrom mmalign.runs import claim_folder\n"
        f"with claim_folder({str(folder)!r}):\n    print('held', flush=True)\n    time.sleep(120)\n")],
        stdout=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.parametrize("recipe, cls, keys", [
    (train_offline, OfflineConfig, ["model.path=m", "data.train=d.jsonl"]),
    (train_online, OnlineConfig, ["model.path=m", "data.prompts=d.jsonl"]),
    (train_sft, SFTConfig, ["model.path=m", "data.train=d.jsonl"]),
    (train_tagging, TaggingConfig, ["model=m", "data.train=d.jsonl"]),
    (train_rloo, RLOOConfig, ["model.path=m", "data.prompts=d.jsonl"]),
    (train_ppo, PPOConfig, ["model.path=m", "data.prompts=d.jsonl"]),
    (train_reward_model, RewardModelConfig, ["model.path=m", "data.train=d.jsonl"]),
])
def test_every_trainer_refuses_a_folder_held_by_a_live_run(tmp_path, recipe, cls, keys):
    holder = _holder(tmp_path)
    try:
        started = time.monotonic()
        with pytest.raises(FolderInUse, match=rf"output folder .* is in use by another run \(pid {holder.pid} on host "
                                              f"{os.uname().nodename}, started .*; lock .*{LOCK_FILE}\\)"):
            recipe(load_config(cls, None, [*keys, f"run.output_dir={tmp_path}"]))
        assert time.monotonic() - started < 5
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_left_by_a_killed_run_is_taken_over_and_released_at_the_end(tmp_path, caplog):
    holder = _holder(tmp_path)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == holder.pid  # the dead run's note is left
    with caplog.at_level(logging.WARNING), claim_folder(tmp_path):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert f"taking over the lock left by pid {holder.pid}" in caplog.text
    assert (tmp_path / LOCK_FILE).read_text() == ""  # a clean end leaves no holder behind
    with claim_folder(tmp_path):  # and the next run in this process takes it at once
        pass


def test_an_output_folder_that_is_a_file_is_a_config_error(tmp_path):
    (tmp_path / "out").write_text("x")
    with pytest.raises(ConfigError, match="exists and is not a folder"), claim_folder(tmp_path / "out"):
        pass


def test_n_independent_copies_of_one_launch_are_refused(monkeypatch):
    check_world_size(1)
    monkeypatch.setenv("WORLD_SIZE", "8")
    with pytest.raises(BrokenLaunch, match=r"launched as one of 8 \(WORLD_SIZE=8\) but accelerate runs 1 process"):
        check_world_size(1)
    check_world_size(8)


def test_fsdp_or_deepspeed_asked_for_but_not_set_up_is_refused(tmp_path, monkeypatch):
    """accelerate 1.15 ignores an FSDP request on CPU (MULTI_CPU gets DDP, a single process gets none)."""
    from mmalign.trainers.common import RunConfig, make_accelerator

    make_accelerator(RunConfig(output_dir=str(tmp_path)))
    with monkeypatch.context() as env:
        env.setenv("ACCELERATE_USE_FSDP", "true")
        with pytest.raises(BrokenLaunch, match="asked for FSDP"):
            make_accelerator(RunConfig(output_dir=str(tmp_path)))
    for name, wanted in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DEEPSPEED")):
        with monkeypatch.context() as env:
            env.setenv(name, "true")
            with pytest.raises(BrokenLaunch, match=rf"asked for {wanted} \({name}=true\) but accelerate runs NO"):
                check_backend("NO")
    check_backend("FSDP")


def test_cpu_launch_command():
    from mmalign.cpu_launch import command

    argv, env = command(3, ["train", "dpo", "x=1"])
    assert argv[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "3", "-m",
                        "mmalign.cli.main", "train", "dpo", "x=1"]
    assert env["ACCELERATE_USE_CPU"] == "true" and env["CUDA_VISIBLE_DEVICES"] == ""  # CPU processes, GPU or not


def test_shipped_accelerate_configs_leave_the_process_count_to_the_command_line():
    import pathlib

    import yaml

    configs = sorted((pathlib.Path(__file__).parents[2] / "configs/accelerate").glob("*.yaml"))
    assert len(configs) == 4
    for path in configs:
        assert "num_processes" not in yaml.safe_load(path.read_text()), path
