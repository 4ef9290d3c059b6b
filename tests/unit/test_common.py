import json

import pytest
import torch

from mmalign.trainers.common import (
    MetricsLogger,
    OptimConfig,
    RunConfig,
    batch_indices,
    build_optimizer,
    build_scheduler,
    latest_checkpoint,
    load_checkpoint,
    make_accelerator,
    save_checkpoint,
)


def test_batch_indices_cover_each_epoch_once_and_are_deterministic():
    n, gb = 10, 3
    epoch0 = [i for s in range(3) for i in batch_indices(n, gb, s, seed=5)]
    assert len(set(epoch0)) == 9  # 3 full batches, one example dropped
    assert batch_indices(n, gb, 1, seed=5) == batch_indices(n, gb, 1, seed=5)
    assert batch_indices(n, gb, 3, seed=5) != batch_indices(n, gb, 0, seed=5)  # epoch 1 reshuffles
    with pytest.raises(ValueError, match="fewer than one global batch"):
        batch_indices(2, 3, 0, seed=0)


def test_projector_gets_its_own_learning_rate_and_frozen_params_are_skipped():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    model[2].weight.requires_grad_(False)
    opt = build_optimizer(model, OptimConfig(lr=1e-3, projector_lr=5e-2), projector_params={"1.weight", "1.bias"})
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 5e-2]
    assert [len(g["params"]) for g in opt.param_groups] == [3, 2]


def test_cosine_schedule_warms_up_then_decays_to_zero():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, OptimConfig(lr=1.0, warmup_ratio=0.2), total_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(0.5) and lrs[2] == pytest.approx(1.0)
    assert lrs[2:] == sorted(lrs[2:], reverse=True) and opt.param_groups[0]["lr"] == pytest.approx(0.0)


def test_metrics_logger_drops_steps_after_the_resumed_checkpoint(tmp_path):
    log = MetricsLogger(tmp_path, enabled=True, report_to=[])
    for step in range(1, 6):
        log.log(step, {"loss": float(step)})
    log.close()
    log = MetricsLogger(tmp_path, enabled=True, report_to=[], resume_step=3)
    log.log(4, {"loss": 40.0})
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["loss"] == 40.0


def _train_steps(model, opt, sched, steps):
    for _ in range(steps):
        loss = model(torch.randn(4, 3)).pow(2).mean()
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()


def test_checkpoint_restores_model_optimizer_scheduler_and_rng(tmp_path):
    run = RunConfig(output_dir=str(tmp_path), seed=0)
    acc = make_accelerator(run)
    model = torch.nn.Linear(3, 1)
    opt = build_optimizer(model, OptimConfig(lr=0.1))
    sched = build_scheduler(opt, OptimConfig(lr=0.1), total_steps=20)
    model, opt = acc.prepare(model, opt)
    acc.register_for_checkpointing(sched)
    _train_steps(model, opt, sched, 3)
    save_checkpoint(acc, tmp_path, 3, {"note": "x"}, keep=1)
    _train_steps(model, opt, sched, 2)
    expected = (model.weight.detach().clone(), sched.get_last_lr())
    save_checkpoint(acc, tmp_path, 5, {}, keep=1)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000005"]
    # a partial save (no trainer_state.json) is never picked
    (tmp_path / "checkpoints" / "step_00000009.tmp").mkdir()
    path = latest_checkpoint(tmp_path)
    assert path.name == "step_00000005"
    _train_steps(model, opt, sched, 4)
    state = load_checkpoint(acc, path)
    assert state["step"] == 5
    torch.testing.assert_close(model.weight.detach(), expected[0])
    assert sched.get_last_lr() == expected[1]


def test_auto_precision_follows_the_hardware(monkeypatch):
    import mmalign.trainers.common as common

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(common, "cpu_has_native_bf16", lambda: False)
    assert RunConfig(mixed_precision="auto").mixed_precision == "no"  # emulated bf16 runs slower than fp32
    monkeypatch.setattr(common, "cpu_has_native_bf16", lambda: True)
    assert RunConfig(mixed_precision="auto").mixed_precision == "bf16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert RunConfig(mixed_precision="auto").mixed_precision == "no"
    assert RunConfig().mixed_precision == "no" and RunConfig(mixed_precision="bf16").mixed_precision == "bf16"


def test_cpu_bf16_flag_is_read_from_cpuinfo(monkeypatch, tmp_path):
    import mmalign.trainers.common as common

    info = tmp_path / "cpuinfo"
    info.write_text("flags\t\t: fpu sse avx2 avx512f\n")
    monkeypatch.setattr(common, "CPUINFO", info)
    assert not common.cpu_has_native_bf16()
    info.write_text("flags\t\t: fpu sse avx2 avx512f avx512_bf16\n")
    assert common.cpu_has_native_bf16()
    monkeypatch.setattr(common, "CPUINFO", tmp_path / "missing")
    assert not common.cpu_has_native_bf16()
