"""Reward-model trainer end to end on tiny VLMs: held-out loss falls; full fine-tuning; grad accumulation 8x1 ==
2x4; the critique-based model on two families (train, reload, score with written and with given critiques);
SIGKILL + resume == uninterrupted; bad records named (file, line, record, field)."""

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
import torch
from test_offline_train import _write, assert_same_weights, make_pairs, metrics

from mmalign.config import load_config
from mmalign.data.images import open_image
from mmalign.data.record_files import read_records, write_records
from mmalign.data.schema import RecordError
from mmalign.models.heads import ScalarHeadModel, load_reward_model, read_spec
from mmalign.models.loading import load_vlm
from mmalign.objectives.reward import bradley_terry
from mmalign.sampling.reward_scoring import RewardScorer, ScorerConfig, load_scorer
from mmalign.trainers.common import latest_checkpoint
from mmalign.trainers.reward_model import MODEL_DIR, RewardModelConfig, train_reward_model

pytestmark = pytest.mark.integration

STEPS = 6


def rm_args(model_dir: Path, data: Path, out: Path, *overrides: str) -> list[str]:
    return [f"model.path={model_dir}", f"data.train={data}", f"run.output_dir={out}", "batch_size=8",
            "lora.rank=4", "lora.alpha=8", "optim.lr=5e-3", "optim.warmup_ratio=0", "optim.schedule=constant",
            "run.log_every=1", "run.report_to=none", "max_steps=2", *overrides]


def rm_config(model_dir: Path, data: Path, out: Path, *overrides: str) -> RewardModelConfig:
    return load_config(RewardModelConfig, None, rm_args(model_dir, data, out, *overrides))


def with_critiques(data: Path) -> Path:
    """The pairs with a critique per answer: whether the colour it names is the image's."""
    records = read_records(data)
    for r in records:
        colour = r.chosen.split()[-1].rstrip(".")
        r.meta["critiques"] = {"chosen": f"Right, it is {colour}.",
                               "rejected": [f"Wrong, it is {colour}." for _ in r.rejected]}
    out = data.with_name(data.stem + "_critiques.jsonl")
    write_records(out, records)
    return out


def heldout_loss(scorer: RewardScorer, data: Path) -> tuple[float, float]:
    """(mean Bradley-Terry loss, accuracy) over every (chosen, rejected_k) pair of ``data``."""
    records = read_records(data)
    scores = scorer.score_records(records, [[open_image(i, data.parent) for i in r.images] for r in records])
    chosen = torch.tensor([s.chosen for s in scores for _ in s.rejected])
    rejected = torch.tensor([x for s in scores for x in s.rejected])
    losses = bradley_terry(chosen, rejected[:, None]).losses
    return losses.mean().item(), (chosen > rejected).float().mean().item()


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return make_pairs(tmp_path_factory.mktemp("rm_pairs"), n=16, seed=0)


@pytest.fixture(scope="module")
def heldout(tmp_path_factory) -> Path:
    return make_pairs(tmp_path_factory.mktemp("rm_heldout"), n=16, seed=7)


def test_training_lowers_the_heldout_loss_and_reloads(tiny_vlm_dir, pairs, heldout, tmp_path):
    model_dir = tiny_vlm_dir("llava")
    out = train_reward_model(rm_config(model_dir, pairs, tmp_path / "rm", "max_steps=30"))
    logged = metrics(out)
    assert [m["step"] for m in logged] == list(range(1, 31))
    assert logged[-1]["loss"] < logged[0]["loss"] and logged[-1]["critique_nll"] == 0.0
    spec = read_spec(out / MODEL_DIR)
    assert (spec.kind, spec.base_model) == ("bradley_terry", str(model_dir.resolve())) and spec.config_hash
    torch.manual_seed(0)
    base, processor = load_vlm(model_dir)
    untrained = RewardScorer(ScalarHeadModel(base), processor, spec, ScorerConfig())
    before, _ = heldout_loss(untrained, heldout)
    after, accuracy = heldout_loss(load_scorer(out / MODEL_DIR), heldout)
    assert after < before - 0.1 and accuracy >= 0.75, (before, after, accuracy)
    plain = load_scorer(out / MODEL_DIR, ScorerConfig(forward="plain"))
    assert heldout_loss(plain, heldout)[0] == pytest.approx(after, abs=1e-5)


def test_full_finetuning_and_grad_accumulation_invariant(tiny_vlm_dir, pairs, tmp_path):
    model_dir = tiny_vlm_dir("llava")
    one = train_reward_model(rm_config(model_dir, pairs, tmp_path / "one", "lora.enabled=false", "optim.lr=1e-3"))
    four = train_reward_model(rm_config(model_dir, pairs, tmp_path / "four", "lora.enabled=false", "optim.lr=1e-3",
                                        "optim.grad_accum=4"))
    for a, b in zip(metrics(one), metrics(four), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    assert_same_weights(one / MODEL_DIR / "model.safetensors", four / MODEL_DIR / "model.safetensors", atol=1e-5)
    assert_same_weights(one / MODEL_DIR / "reward_head.safetensors", four / MODEL_DIR / "reward_head.safetensors",
                        atol=1e-5)
    assert read_spec(one / MODEL_DIR).base_model is None
    model, _ = load_reward_model(one / MODEL_DIR)
    base = load_vlm(model_dir)[0].state_dict()
    moved = model.backbone.state_dict()
    assert any((moved[k] - base[k]).abs().max() > 1e-5 for k in base if "language_model" in k)


@pytest.mark.parametrize("family", ["llava", "gemma3"])  # gemma3: the shared_prefix layout (no prefix cache)
def test_critique_model_trains_reloads_and_scores(tiny_vlm_dir, pairs, family, tmp_path):
    data = with_critiques(pairs)
    out = train_reward_model(rm_config(tiny_vlm_dir(family), data, tmp_path / "rm", "critique.enabled=true",
                                       "data.max_length=256"))
    logged = metrics(out)
    assert logged[0]["critique_nll"] > 0 and logged[-1]["critique_nll"] < logged[0]["critique_nll"]
    assert read_spec(out / MODEL_DIR).kind == "critique"
    records = read_records(data)[:3]
    images = [[open_image(i, data.parent) for i in r.images] for r in records]
    written = load_scorer(out / MODEL_DIR, ScorerConfig(critique_tokens=6)).score_records(records, images)
    given = load_scorer(out / MODEL_DIR, ScorerConfig(critiques="given")).score_records(records, images)
    plain_scorer = load_scorer(out / MODEL_DIR, ScorerConfig(critiques="given", forward="plain"))
    plain = plain_scorer.score_records(records, images)
    for w, g, p, r in zip(written, given, plain, records):
        assert len(w.rejected) == len(r.rejected) and isinstance(w.critiques["chosen"], str)
        assert len(w.critiques["rejected"]) == len(r.rejected) and g.critiques is None
        assert [g.chosen, *g.rejected] == pytest.approx([p.chosen, *p.rejected], abs=1e-5)
    assert any(w.chosen != pytest.approx(g.chosen, abs=1e-6) for w, g in zip(written, given))


def test_sigkill_at_random_step_then_resume_matches_uninterrupted(tiny_vlm_dir, pairs, tmp_path):
    model_dir = tiny_vlm_dir("llava")
    data = with_critiques(pairs)
    settings = (f"max_steps={STEPS}", "critique.enabled=true", "data.max_length=256", "loss.center=0.01")
    full = train_reward_model(rm_config(model_dir, data, tmp_path / "full", *settings))
    kill_after = random.randint(2, STEPS - 2)
    out = tmp_path / "killed"
    args = [*rm_args(model_dir, data, out, *settings), "run.save_every=1"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "mmalign.cli.main", "train", "rm", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log, deadline = out / "metrics.jsonl", time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if log.exists() and len(log.read_text().splitlines()) >= kill_after:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert not (out / MODEL_DIR).exists() and latest_checkpoint(out) is not None
    from mmalign.cli.main import main

    assert main(["train", "rm", "--resume", *args]) == 0
    resumed = metrics(out)
    assert [m["step"] for m in resumed] == list(range(1, STEPS + 1))
    assert resumed[-1]["loss"] == pytest.approx(metrics(full)[-1]["loss"], abs=1e-6), f"killed after {kill_after}"
    for name in ("adapter_model.safetensors", "reward_head.safetensors"):
        assert_same_weights(full / MODEL_DIR / name, out / MODEL_DIR / name)


def test_bad_records_are_named(tiny_vlm_dir, pairs, tmp_path, capsys):
    model_dir = tiny_vlm_dir("llava")
    rows = [json.loads(line) for line in with_critiques(pairs).read_text().splitlines()]
    data = _write(pairs.parent / "bad.jsonl", rows[:5] + [dict(rows[5], id="uncritiqued", meta={})] + rows[6:])
    with pytest.raises(RecordError, match=r"bad.jsonl, line 6, record 'uncritiqued', field 'meta.critiques'"):
        train_reward_model(rm_config(model_dir, data, tmp_path / "a", "critique.enabled=true"))
    short = dict(rows[2], id="short", meta={"critiques": {"chosen": "Right.", "rejected": []}})
    data = _write(pairs.parent / "bad2.jsonl", rows[:2] + [short] + rows[3:])
    with pytest.raises(RecordError, match=r"line 3, record 'short', field 'meta.critiques.rejected'"):
        train_reward_model(rm_config(model_dir, data, tmp_path / "b", "critique.enabled=true"))
    from mmalign.cli.main import main

    assert main(["train", "rm", *rm_args(model_dir, pairs, tmp_path / "c", "loss.margin_key=absent")]) == 2
    assert "record 'r0', field 'meta.absent'" in capsys.readouterr().err


def test_two_cpu_processes_equal_one_process(tiny_vlm_dir, pairs, tmp_path):
    """DDP (gloo, torchrun): the wrapped head model, called twice per forward (prompt cache, then answers)."""
    import socket

    model_dir = tiny_vlm_dir("llava")
    extra = ("max_steps=3", "optim.grad_accum=2", "loss.center=0.01")
    one = train_reward_model(rm_config(model_dir, pairs, tmp_path / "one", *extra))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    args = ["-m", "mmalign.cli.main", "train", "rm", *rm_args(model_dir, pairs, tmp_path / "two", *extra)]
    done = subprocess.run([*launch, *args], env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
                                                     ACCELERATE_USE_CPU="true"),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for a, b in zip(metrics(one), metrics(tmp_path / "two"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6) and a["margin"] == pytest.approx(b["margin"], abs=1e-6)
    for name in ("adapter_model.safetensors", "reward_head.safetensors"):
        assert_same_weights(one / MODEL_DIR / name, tmp_path / "two" / MODEL_DIR / name, atol=1e-5)
