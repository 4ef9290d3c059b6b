"""``mmalign sample bdhs`` end to end on a saved tiny LLaVA with the real embedding filter: valid records and
summary; a SIGKILLed run resumes to the same file; 2 CPU processes (gloo) write the same file as 1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmalign.cli.main import main
from mmalign.data.record_files import provenance_path, read_records, write_records
from mmalign.data.schema import PreferenceRecord
from mmalign.sampling.bdhs_run import summary_path
from mmalign.sampling.shards import work_dir_for

pytestmark = pytest.mark.integration

N_RECORDS = 10
MMALIGN = str(Path(sys.executable).with_name("mmalign"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bdhs_data")
    (root / "images").mkdir()
    records = []
    for i in range(N_RECORDS):
        pixels = np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{i}.png")
        chosen = "Yes." if i % 3 == 0 else "There is a red circle and a blue square. The circle is on the left."
        prompt = "<image>\nIs there a red circle in the image?" if i % 3 == 0 else "<image>\nDescribe the image."
        records.append(PreferenceRecord(f"img-{i}", [f"images/{i}.png"], prompt, chosen,
                                        ["There is a green star."] if i == 1 else []))
    write_records(root / "prompts.jsonl", records)
    return root


def _args(model_dir: Path, data: Path, output: Path, *extra: str) -> list[str]:
    return ["sample", "bdhs", f"input={data / 'prompts.jsonl'}", f"output={output}", f"model={model_dir}",
            "bdhs.n_iter=3", "bdhs.rho=0.5", "bdhs.max_sentence_tokens=6", "bdhs.max_answer_tokens=8", *extra]


def _env() -> dict[str, str]:
    return os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}


def _same_records(a: Path, b: Path) -> bool:
    """Same records line for line. The filter's cosine similarity is compared to 1e-6: subprocesses run with one
    thread, the in-process reference with the parent's, and float reductions differ in the last digits."""
    rows_a = [json.loads(line) for line in a.read_text().splitlines()]
    rows_b = [json.loads(line) for line in b.read_text().splitlines()]
    if len(rows_a) != len(rows_b):
        return False
    for ra, rb in zip(rows_a, rows_b):
        sim_a, sim_b = ra["meta"]["bdhs"].pop("similarity"), rb["meta"]["bdhs"].pop("similarity")
        if ra != rb or abs(sim_a - sim_b) > 1e-6:
            return False
    return True


def _same_summary(a: Path, b: Path) -> bool:
    summary_a, summary_b = json.loads(a.read_text()), json.loads(b.read_text())
    mean_a, mean_b = summary_a.pop("mean_similarity"), summary_b.pop("mean_similarity")
    return summary_a == summary_b and abs(mean_a - mean_b) <= 1e-6


@pytest.fixture(scope="module")
def reference(tiny_vlm_dir, data, tmp_path_factory) -> Path:
    """One uninterrupted single-process run (in-process, through the CLI entry point)."""
    output = tmp_path_factory.mktemp("bdhs_ref") / "pairs.jsonl"
    assert main(_args(tiny_vlm_dir("llava"), data, output, "bdhs.batch_size=4")) == 0
    return output


def test_run_writes_valid_pairs_provenance_and_summary(reference, data):
    records = read_records(reference, data_root=data, min_rejected=1)
    summary = json.loads(summary_path(reference).read_text())
    assert len(records) + len(summary["dropped"]) == N_RECORDS == summary["records"]
    assert sum(summary["accepted_at_iteration"].values()) == pytest.approx(1.0)
    by_id = {r.id: r for r in records}
    if "img-1" in by_id:
        assert by_id["img-1"].rejected[0] == "There is a green star."  # existing rejected kept before BDHS's
    for record in records:
        info = record.meta["bdhs"]
        assert 1 <= info["iteration"] <= 3 and info["unguided"] == (info["iteration"] == 3)
        assert info["rho"] == 0.5 and -1.0 <= info["similarity"] <= 1.0 + 1e-6
        assert record.rejected[-1] != record.chosen  # the BDHS answer comes last (Apple Eq. 5 order)
        assert 0 <= info["visible_tokens"] <= info["image_tokens"] > 0
    mask = summary["mask"]  # the summary averages the written records' masks and counts those that hid everything
    visible = [r.meta["bdhs"]["visible_tokens"] for r in records]
    if not summary["dropped"]:
        assert mask["visible_tokens_mean"] == pytest.approx(sum(visible) / len(visible))
        assert mask["all_hidden_share"] == pytest.approx(sum(v == 0 for v in visible) / len(visible))
    assert 0 < mask["visible_tokens_mean"] < mask["image_tokens_mean"]  # rho 0.5 hides about half
    provenance = json.loads(provenance_path(reference).read_text())
    assert provenance["sampler"] == "bdhs" and provenance["count"] == len(records)
    assert not work_dir_for(reference).exists()


def test_sigkill_then_restart_gives_the_same_file(reference, tiny_vlm_dir, data, tmp_path):
    output = tmp_path / "pairs.jsonl"
    args = _args(tiny_vlm_dir("llava"), data, output, "bdhs.batch_size=1")
    proc = subprocess.Popen([MMALIGN, *args], env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    shard = work_dir_for(output) / "shard-00000.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if shard.exists() and shard.read_text().count("\n") >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = shard.read_text().count("\n")
    assert 2 <= done_before < N_RECORDS and not output.exists()
    finished = subprocess.run([MMALIGN, *args], env=_env(), capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert _same_records(output, reference)
    assert _same_summary(summary_path(output), summary_path(reference))


def test_two_cpu_processes_write_the_same_file_as_one(reference, tiny_vlm_dir, data, tmp_path):
    output = tmp_path / "pairs.jsonl"
    # The CPU launcher: torchrun spawns the 2 processes, ACCELERATE_USE_CPU joins them over gloo
    # (``accelerate launch --cpu`` leaves spawning to MPI).
    launch = [sys.executable, "-m", "mmalign.cpu_launch", "2"]
    done = subprocess.run([*launch, *_args(tiny_vlm_dir("llava"), data, output, "bdhs.batch_size=3")],
                          env=_env(), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "process 1:" in done.stderr  # both processes sampled their share
    assert _same_records(output, reference)
    assert _same_summary(summary_path(output), summary_path(reference))


def test_resuming_with_other_settings_is_refused(tiny_vlm_dir, data, tmp_path, capsys):
    output = tmp_path / "pairs.jsonl"
    work_dir_for(output).mkdir()
    (work_dir_for(output) / "run.json").write_text(json.dumps({"bdhs": {}, "dtype": None}))
    assert main(_args(tiny_vlm_dir("llava"), data, output)) == 2
    assert "holds a run with other settings" in capsys.readouterr().err


def test_a_bad_record_exits_2_naming_record_and_field(data, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "img-7", "images": ["images/0.png"], "prompt": "<image>\nDescribe the image.",
                               "chosen": 5, "rejected": []}) + "\n")
    assert main(["sample", "bdhs", f"input={bad}", f"output={tmp_path / 'out.jsonl'}", f"model={tmp_path}",
                 f"data_root={data}"]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl" in err and "record 'img-7'" in err and "field 'chosen'" in err
    assert not (tmp_path / "out.jsonl").exists()


def test_an_empty_input_exits_2_naming_the_file(data, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["sample", "bdhs", f"input={empty}", f"output={tmp_path / 'out.jsonl'}", f"model={tmp_path}",
                 f"data_root={data}"]) == 2
    assert "empty.jsonl: no records to sample" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()


def test_an_answer_longer_than_the_context_is_a_record_error_or_skipped(tiny_vlm_dir, data, tmp_path, capsys):
    """A long reference answer would grow every guided generation row with it; it is refused up front."""
    records = read_records(data / "prompts.jsonl")
    long = PreferenceRecord("long", records[1].images, records[1].prompt, "There is a red circle. " * 400, [])
    write_records(tmp_path / "in.jsonl", [records[1], long])
    args = ["sample", "bdhs", f"input={tmp_path / 'in.jsonl'}", f"model={tiny_vlm_dir('llava')}", f"data_root={data}",
            "bdhs.n_iter=1", "bdhs.max_sentence_tokens=4", "bdhs.max_answer_tokens=4"]
    assert main([*args, f"output={tmp_path / 'out.jsonl'}"]) == 2
    err = capsys.readouterr().err
    assert "record 'long', field 'chosen'" in err and "more than 1024 (max_length 4096, model context 1024)" in err
    assert not (tmp_path / "out.jsonl").exists()
    assert main([*args, f"output={tmp_path / 'kept.jsonl'}", f"skip_invalid_to={tmp_path / 'skipped.jsonl'}"]) == 0
    assert [r.id for r in read_records(tmp_path / "kept.jsonl", data_root=data)] == [records[1].id]
    assert [json.loads(line)["id"] for line in (tmp_path / "skipped.jsonl").read_text().splitlines()] == ["long"]


def test_a_second_run_into_the_same_output_fails_fast_naming_the_holder(data, tmp_path, capsys):
    output = tmp_path / "pairs.jsonl"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom mmalign.runs import claim_output\n"
        f"with claim_output({str(tmp_path / '.pairs.jsonl.lock')!r}, 'x'):\n"
        "    print('held', flush=True)\n    time.sleep(120)\n")], env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        assert main(["sample", "bdhs", f"input={data / 'prompts.jsonl'}", f"output={output}", f"model={tmp_path}"]) == 2
        assert time.monotonic() - started < 10
        err = capsys.readouterr().err
        assert f"is in use by another run (pid {holder.pid} on host" in err and not output.exists()
    finally:
        holder.kill()
        holder.wait()
