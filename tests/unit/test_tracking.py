"""Trackers through accelerate (TensorBoard by default; W&B offline and MLflow on a local store when installed)
and the progress bars' switch."""

import json
import logging

import pytest

from mmalign.progress import in_batches, progress, shown, track
from mmalign.tracking import Trackers, check_report_to, flat_config
from mmalign.trainers.common import MetricsLogger, RunConfig


def _scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_gets_what_metrics_jsonl_gets_and_resume_purges(tmp_path):
    log = MetricsLogger(tmp_path, enabled=True, report_to=["tensorboard"], config={"optim": {"lr": 0.1}})
    for step in (1, 2, 3):
        log.log(step, {"loss": 1.0 / step, "rewards/accuracies": step / 4})
    log.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["loss"] for line in lines] == [1.0, 0.5, 1 / 3]
    scalars = _scalars(tmp_path / "tensorboard")
    assert [s for s, _ in scalars["loss"]] == [1, 2, 3]
    assert [v for _, v in scalars["rewards/accuracies"]] == pytest.approx([0.25, 0.5, 0.75])
    resumed = MetricsLogger(tmp_path, enabled=True, report_to=["tensorboard"], resume_step=1)
    resumed.log(2, {"loss": 9.0, "rewards/accuracies": 0.0})
    resumed.close()
    assert dict(_scalars(tmp_path / "tensorboard")["loss"]) == {1: 1.0, 2: 9.0}  # the killed run's 2, 3 purged


def test_disabled_logger_writes_nothing(tmp_path):
    log = MetricsLogger(tmp_path / "x", enabled=False, report_to=["tensorboard"])
    log.log(1, {"loss": 1.0})
    log.close()
    assert not (tmp_path / "x").exists()


def test_report_to_is_checked(monkeypatch):
    assert check_report_to(["none"]) == [] and check_report_to([]) == []
    assert check_report_to(["tensorboard", "tensorboard"]) == ["tensorboard"]
    with pytest.raises(ValueError, match="unknown tracker"):
        RunConfig(report_to=["neptune"])
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None if name == "wandb" else object())
    with pytest.raises(ValueError, match=r"\['wandb'\] not installed"):
        check_report_to(["wandb"])


def test_flat_config():
    assert flat_config({"a": {"b": 1, "c": [1, 2]}, "d": None}) == {"a.b": 1, "a.c": "[1, 2]", "d": "None"}


def test_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    trackers = Trackers(["wandb"], tmp_path / "run_a", {"loss": {"beta": 0.1}})
    trackers.log({"loss": 0.5}, step=1)
    trackers.log({"loss": 0.25}, step=2)
    run = trackers.trackers[0].run
    assert (run.name, run.project, dict(run.config)) == ("run_a", "mmalign", {"loss.beta": 0.1})
    assert run.step == 2 and run.summary["loss"] in (0.5, 0.25)  # wandb commits a step when the next begins
    trackers.close()
    assert list((tmp_path / "run_a" / "wandb").glob("offline-run-*/run-*.wandb"))


def test_mlflow_local_store(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "mmalign-test")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a local file store, no database needed
    trackers = Trackers(["mlflow"], tmp_path / "run_b", {"optim": {"lr": 0.001}})
    trackers.log({"loss": 0.5}, step=1)
    trackers.log({"loss": 0.25}, step=2)
    run_id = trackers.trackers[0].active_run.info.run_id
    trackers.close()
    client = mlflow.tracking.MlflowClient()
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(1, 0.5), (2, 0.25)]
    run = client.get_run(run_id)
    assert run.data.params["optim.lr"] == "0.001" and run.info.run_name == "run_b"


def test_bars_follow_the_progress_logger(capsys):
    logger = logging.getLogger("mmalign.progress")
    logger.setLevel(logging.WARNING)
    assert not shown()
    assert list(track([1, 2, 3], "quiet")) == [1, 2, 3]
    assert capsys.readouterr().err == ""
    logger.setLevel(logging.INFO)
    try:
        assert shown() and not shown(enabled=False)
        assert [list(c) for c in in_batches(list(range(5)), 2, "loud")] == [[0, 1], [2, 3], [4]]
        err = capsys.readouterr().err
        assert "loud" in err and "5/5" in err
        with progress(2, "off", enabled=False) as bar:
            bar.update(2)
        assert capsys.readouterr().err == ""
    finally:
        logger.setLevel(logging.NOTSET)
