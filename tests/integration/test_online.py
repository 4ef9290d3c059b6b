"""Online trainers end to end on a tiny ShapesWorld lab: Online-DPO pairs audited against the oracle, Mixed-DPO's
offline share (Eq. 4), grad-accumulation invariant, Online-BDHS (Eq. 5 slots), SIGKILL resume reusing the stored
pairs, the CLI and the annotator evaluation."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmalign.cli.main import main
from mmalign.config import load_config
from mmalign.data.record_files import read_records, write_records
from mmalign.evaluation.annotators import AnnotatorEvalConfig, evaluate_annotator
from mmalign.lab.build import LabConfig, SplitSizes, build_lab
from mmalign.lab.corrupt import corrupt_lab_records
from mmalign.lab.world import WorldConfig
from mmalign.lab.model import LabModelConfig, build_lab_model
from mmalign.sampling.annotators import AnnotatorConfig, LabOracle, read_synonyms
from mmalign.sampling.rollouts import read_step, takes_offline
from mmalign.trainers.common import latest_checkpoint
from mmalign.trainers.online import OnlineConfig, train_online

pytestmark = pytest.mark.integration

STEPS = 4


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> dict[str, Path]:
    """A 16-prompt lab with exactly corrupted pairs and a small random lab LLaVA."""
    root = tmp_path_factory.mktemp("online_lab")
    lab_dir = build_lab(LabConfig(out_dir=str(root / "lab"), sizes=SplitSizes(sft=4, pref=16, eval=4, vision=4),
                                  world=WorldConfig(image_size=32, min_size=8, max_size=14)))
    bias = json.loads((lab_dir / "bias.json").read_text())["pairs"]
    write_records(lab_dir / "pairs.jsonl", corrupt_lab_records(read_records(lab_dir / "pref_prompts.jsonl"), bias, 0))
    model, processor = build_lab_model(LabModelConfig(image_size=32, vision_hidden=32, text_hidden=64, text_layers=2,
                                                      heads=2))
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    return {"lab": lab_dir, "model": root / "model", "pairs": lab_dir / "pairs.jsonl"}


def args(lab: dict[str, Path], out: Path, *overrides: str) -> list[str]:
    return [f"model.path={lab['model']}", f"data.prompts={lab['pairs']}", f"run.output_dir={out}",
            f"annotator.synonyms={lab['lab'] / 'vocab/synonyms.txt'}", "lora.rank=4", "lora.alpha=8", "batch_size=4",
            f"max_steps={STEPS}", "rollout.k=3", "rollout.max_new_tokens=10", "optim.lr=5e-3", "optim.warmup_ratio=0",
            "optim.schedule=constant", "run.log_every=1", "run.report_to=none", *overrides]


def run(lab: dict[str, Path], out: Path, *overrides: str) -> Path:
    return train_online(load_config(OnlineConfig, None, args(lab, out, *overrides)))


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter/adapter_model.safetensors"))


def test_online_pairs_are_oracle_ranked_stored_and_exported(lab, tmp_path):
    out = run(lab, tmp_path / "online")
    oracle = LabOracle(read_synonyms(lab["lab"] / "vocab/synonyms.txt"))
    records = {r.id: r for r in read_records(lab["pairs"])}
    n_pairs = 0
    for step in range(1, STEPS + 1):
        entries = read_step(out / "pairs", step)
        assert len(entries) == 4 and all(len(e["rollouts"]) == 3 and e["source"] == "online" for e in entries)
        for e in entries:
            scores = [oracle.score(records[e["record_id"]], a) for a in e["rollouts"]]
            assert e["verdict"]["scores"] == scores
            if e["pair"] is not None:
                n_pairs += 1
                assert e["pair"]["chosen"] == e["rollouts"][e["chosen"]] and scores[e["chosen"]] == max(scores)
                assert e["pair"]["rejected"] == [e["rollouts"][e["rejected"]]] and scores[e["rejected"]] == min(scores)
    assert n_pairs > 0
    exported = read_records(out / "online_pairs.jsonl", data_root=lab["lab"], min_rejected=1)
    assert len(exported) == n_pairs and all(r.source == "online" for r in exported)
    log = metrics(out)
    assert [m["step"] for m in log] == list(range(1, STEPS + 1)) and all(m["pairs/reused"] == 0.0 for m in log)
    assert (out / "merged/config.json").is_file()
    # Same pairs split into two micro-batches per step: the mean over pairs, hence the update, is unchanged.
    accum = run(lab, tmp_path / "accum", "optim.grad_accum=2")
    assert [read_step(accum / "pairs", s) for s in range(1, STEPS + 1)] == \
           [read_step(out / "pairs", s) for s in range(1, STEPS + 1)]
    for name, tensor in weights(out).items():  # Adam turns float-order noise in near-zero gradients into ~1e-5
        torch.testing.assert_close(weights(accum)[name], tensor, atol=5e-5, rtol=1e-4)


def test_mixed_takes_offline_pairs_with_probability_p_through_cli(lab, tmp_path):
    assert main(["train", "mixed-dpo", *args(lab, tmp_path / "mixed", "--mix_p", "0.5", "run.seed=3")]) == 0
    records = {r.id: r for r in read_records(lab["pairs"])}
    for step in range(1, STEPS + 1):
        for e in read_step(tmp_path / "mixed/pairs", step):
            offline = takes_offline(3, step, e["record_id"], 0.5)
            assert e["source"] == ("offline" if offline else "online")
            if offline:
                r = records[e["record_id"]]
                assert (e["pair"]["chosen"], e["pair"]["rejected"]) == (r.chosen, r.rejected[:1])
    shares = [m["pairs/fraction_offline"] for m in metrics(tmp_path / "mixed")]
    assert 0 < sum(shares) / len(shares) < 1


def test_online_bdhs_pairs_keep_external_then_policy_rejected(lab, tmp_path):
    out = run(lab, tmp_path / "bdhs", "mode=online_bdhs", "max_steps=2", "bdhs.n_iter=2",
              "bdhs.max_sentence_tokens=8", "bdhs.max_answer_tokens=10")
    records = {r.id: r for r in read_records(lab["pairs"])}
    entries = read_step(out / "pairs", 1) + read_step(out / "pairs", 2)
    assert len(entries) == 8 and all(e["source"] == "online_bdhs" for e in entries)
    for e in entries:
        if e["pair"] is not None:
            r = records[e["record_id"]]
            assert e["pair"]["chosen"] == r.chosen
            assert e["pair"]["rejected"] == [r.rejected[0], e["rollouts"][0]]  # (y-, y~-) weighted (gamma, 1-gamma)
    assert "loss" in metrics(out)[-1]


def _env() -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def test_sigkill_resume_reuses_stored_pairs_and_matches_uninterrupted(lab, tmp_path):
    full = run(lab, tmp_path / "full")
    out = tmp_path / "killed"
    code = ("import sys; from mmalign.config import load_config; from mmalign.trainers.online import OnlineConfig, "
            "train_online; train_online(load_config(OnlineConfig, None, sys.argv[1:]))")
    proc = subprocess.Popen([sys.executable, "-c", code, *args(lab, out, "run.save_every=1")], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if (out / "pairs/step_00000002.jsonl").exists():
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    stored = {p.name: (p.stat().st_mtime_ns, p.read_text()) for p in (out / "pairs").glob("step_*.jsonl")}
    checkpoint = int(latest_checkpoint(out).name.split("_")[1])
    paid_after_checkpoint = {s for s in range(checkpoint + 1, STEPS + 1) if f"step_{s:08d}.jsonl" in stored}
    assert paid_after_checkpoint, f"no step annotated after checkpoint {checkpoint} (kill came too late)"
    resumed = run(lab, out, "run.save_every=1", "run.resume=true")
    for name, (mtime, text) in stored.items():  # paid-for pairs are read back, never re-sampled or rewritten
        path = out / "pairs" / name
        assert (path.stat().st_mtime_ns, path.read_text()) == (mtime, text)
    log = metrics(resumed)
    assert [m["step"] for m in log] == list(range(1, STEPS + 1))
    assert {m["step"] for m in log if m["pairs/reused"] == 1.0} == paid_after_checkpoint
    for step in range(1, STEPS + 1):
        assert read_step(out / "pairs", step) == read_step(full / "pairs", step)
    for name, tensor in weights(full).items():
        torch.testing.assert_close(weights(resumed)[name], tensor, atol=1e-6, rtol=1e-5)


def test_annotator_eval_oracle_and_noisy_oracle(lab, tmp_path):
    synonyms = str(lab["lab"] / "vocab/synonyms.txt")
    exact = evaluate_annotator(AnnotatorEvalConfig(data=str(lab["pairs"]), out_dir=str(tmp_path / "exact"),
                                                   annotator=AnnotatorConfig(synonyms=synonyms), n_boot=50))
    assert exact["accuracy"]["value"] == 1.0 and exact["no_preference"]["value"] == 0.0
    assert exact["position_bias"]["value"] is None  # a scoring annotator has no positions
    noisy = evaluate_annotator(AnnotatorEvalConfig(
        data=str(lab["pairs"]), out_dir=str(tmp_path / "noisy"), n_boot=50,
        annotator=AnnotatorConfig(synonyms=synonyms, error_rate=1.0)))
    assert noisy["accuracy"]["value"] == 0.0
    rows = [json.loads(line) for line in (tmp_path / "noisy/samples.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and all(r["verdict"]["flipped"] for r in rows)
    assert main(["eval", "annotator", f"data={lab['pairs']}", f"out_dir={tmp_path / 'cli'}",
                 f"annotator.synonyms={synonyms}", "n_boot=20"]) == 0
    assert (tmp_path / "cli/metrics.json").is_file()


def test_two_processes_update_like_one_on_the_same_pairs_and_gather_new_ones(lab, tmp_path):
    """Steps 1-2 pre-seeded with the 1-process run's pairs (reused, so the update must match exactly);
    steps 3-4 collected by 2 processes, each sampling its share, gathered into one file per step."""
    extra = ("run.save_every=1", "run.keep_checkpoints=10", "optim.grad_accum=2", "rollout.k=4",
             "rollout.max_new_tokens=16")
    one = run(lab, tmp_path / "one", *extra)
    two = tmp_path / "two"
    (two / "pairs").mkdir(parents=True)
    for step in (1, 2):
        name = f"step_{step:08d}.jsonl"
        (two / "pairs" / name).write_text((one / "pairs" / name).read_text())
    script = tmp_path / "train.py"
    script.write_text("import sys\nfrom mmalign.config import load_config\n"
                      "from mmalign.trainers.online import OnlineConfig, train_online\n"
                      "train_online(load_config(OnlineConfig, None, sys.argv[1:]))\n")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines",
              "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port)]
    done = subprocess.run([*launch, str(script), *args(lab, two, *extra)], env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    log_one, log_two = metrics(one), metrics(two)
    assert any("loss" in m for m in log_one[:2])  # at least one update on the shared pairs
    for a, b in zip(log_one[:2], log_two[:2]):
        assert b["pairs/reused"] == 1.0 and a.get("loss") == pytest.approx(b.get("loss"), abs=1e-6)
    ckpt = "checkpoints/step_00000002/model.safetensors"
    for name, tensor in load_file(str(one / ckpt)).items():
        torch.testing.assert_close(load_file(str(two / ckpt))[name], tensor, atol=1e-5, rtol=1e-5)
    for step in (3, 4):
        entries = read_step(two / "pairs", step)
        assert log_two[step - 1]["pairs/reused"] == 0.0
        assert len(entries) == 4 and len({e["record_id"] for e in entries}) == 4
