"""Checkpoints: exact restore (model, optimizer, schedule, RNG), damaged newest skipped for the intact older one,
planted pickles never run, torn metrics lines, and the non-finite-loss stop."""

from __future__ import annotations

import json
import logging
import os
import pickle

import pytest
import torch

from mmalign.trainers.checkpoints import (
    STATE_FILE, checkpoint_problem, checkpoints, latest_checkpoint, resume_from, save_checkpoint,
)
from mmalign.runs import TrainingStopped
from mmalign.trainers.common import (
    MetricsLogger, OptimConfig, RunConfig, build_optimizer, build_scheduler, make_accelerator, stop_if_not_finite,
)


def _train_steps(model, opt, sched, steps):
    for _ in range(steps):
        loss = model(torch.randn(4, 3).to(next(model.parameters()).device)).pow(2).mean()
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()


def _setup(tmp_path):
    acc = make_accelerator(RunConfig(output_dir=str(tmp_path), seed=0))
    model = torch.nn.Linear(3, 1)
    opt = build_optimizer(model, OptimConfig(lr=0.1))
    sched = build_scheduler(opt, OptimConfig(lr=0.1), total_steps=20)
    model, opt = acc.prepare(model, opt)
    return acc, model, opt, sched


@pytest.fixture
def two_checkpoints(tmp_path):
    """Checkpoints after steps 3 and 5 of a tiny run, the weights and lr at each, and the live objects."""
    acc, model, opt, sched = _setup(tmp_path)
    after = {}
    for step, n in ((3, 3), (5, 2)):
        _train_steps(model, opt, sched, n)
        save_checkpoint(acc, tmp_path, step, {"note": step}, keep=2, scheduler=sched)
        after[step] = (model.weight.detach().clone(), sched.get_last_lr(), torch.rand(1))
    _train_steps(model, opt, sched, 4)  # move everything away from both checkpoints
    return tmp_path, acc, model, sched, after


def _restored(model, sched, after, step):
    torch.testing.assert_close(model.weight.detach(), after[step][0])
    assert sched.get_last_lr() == after[step][1]
    assert torch.equal(torch.rand(1), after[step][2])  # the RNG continues exactly where it was


def test_resume_restores_model_optimizer_schedule_and_rng_without_pickled_scheduler(two_checkpoints):
    out, acc, model, sched, after = two_checkpoints
    assert [p.name for p in checkpoints(out)] == ["step_00000005", "step_00000003"]
    folder = out / "checkpoints/step_00000005"
    assert not list(folder.glob("custom_checkpoint_*")) and not list(folder.glob("scheduler*"))
    state = json.loads((folder / STATE_FILE).read_text())
    assert state["num_processes"] == 1 and state["note"] == 5 and state["scheduler"]["last_epoch"] == 5
    assert set(state["files"]) == {p.name for p in folder.iterdir()} - {STATE_FILE}
    assert resume_from(acc, out, sched)["step"] == 5
    _restored(model, sched, after, 5)


def _damage(folder, how):
    if how == "truncated optimizer":
        data = (folder / "optimizer.bin").read_bytes()
        (folder / "optimizer.bin").write_bytes(data[: len(data) // 2])
    elif how == "same-size bit flip in the weights":
        data = bytearray((folder / "model.safetensors").read_bytes())
        data[-1] ^= 0xFF
        (folder / "model.safetensors").write_bytes(bytes(data))
    elif how == "missing RNG state":
        (folder / "rng_0.json").unlink()
    elif how == "garbage state file":
        (folder / STATE_FILE).write_text('{"step": 5, "sched')
    elif how == "state file without manifest":
        state = json.loads((folder / STATE_FILE).read_text())
        del state["files"]
        (folder / STATE_FILE).write_text(json.dumps(state))


@pytest.mark.parametrize("how", ["truncated optimizer", "same-size bit flip in the weights", "missing RNG state",
                                 "garbage state file", "state file without manifest"])
def test_damaged_newest_checkpoint_is_skipped_for_the_intact_older_one(two_checkpoints, how, caplog):
    out, acc, model, sched, after = two_checkpoints
    newest = out / "checkpoints/step_00000005"
    _damage(newest, how)
    assert checkpoint_problem(newest) is not None and checkpoint_problem(out / "checkpoints/step_00000003") is None
    assert latest_checkpoint(out).name == "step_00000003"
    with caplog.at_level(logging.WARNING):
        assert resume_from(acc, out, sched)["step"] == 3
    assert "skipping damaged checkpoint" in caplog.text and "step_00000005" in caplog.text
    _restored(model, sched, after, 3)


class _Payload:
    """Unpickling this runs ``touch <marker>``: what a planted checkpoint file would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _plant(folder, name, marker, as_torch):
    path = folder / name
    if as_torch:
        torch.save({"state": _Payload(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(_Payload(marker)))
    state = json.loads((folder / STATE_FILE).read_text())  # an attacker fixes the manifest too
    state["files"][name] = {"bytes": path.stat().st_size,
                            "sha256": __import__("hashlib").sha256(path.read_bytes()).hexdigest()}
    (folder / STATE_FILE).write_text(json.dumps(state))


@pytest.mark.parametrize("name, as_torch, resumed_step", [
    ("custom_checkpoint_0.pkl", False, 3),  # unpickled by accelerate for a registered scheduler; none is
    ("scheduler.bin", True, 5),
    ("optimizer.bin", True, 3),  # read with weights_only: refused, so the older checkpoint is used
    ("random_states_0.pkl", False, 5),  # accelerate's RNG pickle is not written, and not needed
])
def test_a_planted_pickle_never_runs(two_checkpoints, tmp_path_factory, name, as_torch, resumed_step, caplog):
    out, acc, model, sched, after = two_checkpoints
    marker = tmp_path_factory.mktemp("marker") / "pwned"
    _plant(out / "checkpoints/step_00000005", name, marker, as_torch)
    with caplog.at_level(logging.WARNING):
        assert resume_from(acc, out, sched)["step"] == resumed_step
    assert not marker.exists()
    _restored(model, sched, after, resumed_step)
    if resumed_step == 3:
        assert "does not load" in caplog.text


def test_no_checkpoint_left_resumes_nothing(two_checkpoints):
    out, acc, model, sched, after = two_checkpoints
    for folder in checkpoints(out):
        _damage(folder, "truncated optimizer")
    assert resume_from(acc, out, sched) is None and latest_checkpoint(out) is None


def test_keep_and_unfinished_saves(tmp_path):
    acc, model, opt, sched = _setup(tmp_path)
    for step in (1, 2, 3):
        save_checkpoint(acc, tmp_path, step, {}, keep=1, scheduler=sched)
    (tmp_path / "checkpoints/step_00000009.tmp").mkdir()  # a save killed midway is never picked
    assert [p.name for p in checkpoints(tmp_path)] == ["step_00000003"]
    assert latest_checkpoint(tmp_path).name == "step_00000003"


def test_metrics_log_with_a_torn_last_line_resumes_and_a_damaged_middle_line_is_named(tmp_path, caplog):
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "lo')
    with caplog.at_level(logging.WARNING):
        MetricsLogger(tmp_path, enabled=True, report_to=[], resume_step=3).log(4, {"loss": 4.0})
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3, 4]
    assert "torn last line" in caplog.text
    log.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="metrics.jsonl, line 2: damaged metrics line"):
        MetricsLogger(tmp_path, enabled=True, report_to=[], resume_step=2)


def test_non_finite_loss_or_gradient_stops_the_step(tmp_path):
    acc = make_accelerator(RunConfig(output_dir=str(tmp_path)))
    stop_if_not_finite(acc, 1, {"loss": torch.tensor(0.5), "grad_norm": 3.0})
    with pytest.raises(TrainingStopped, match=r"step 7: loss became non-finite \(local values loss=nan"):
        stop_if_not_finite(acc, 7, {"loss": torch.tensor(float("nan")), "grad_norm": 3.0})
    with pytest.raises(TrainingStopped, match="step 2: grad_norm became non-finite"):
        stop_if_not_finite(acc, 2, {"loss": 0.1, "grad_norm": torch.tensor(float("inf"))})
