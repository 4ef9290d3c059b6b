"""The bad-config corpus: broken YAML files and overrides, values out of range (NaN, infinities, negatives), and
settings that only meet the data or the model at run time. Each exits 2 with one line on stderr that names
the file or key at fault, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmalign.cli.main import main
from mmalign.data.record_files import write_records
from mmalign.data.schema import PreferenceRecord

DPO = ["train", "dpo", "model.path=MODEL", "data.train=DATA", "run.output_dir=OUT"]

# kind -> (YAML text of --config or None, the rest of the command line, a piece of the error)
CONFIG_ERRORS: dict[str, tuple[str | None, list[str], str]] = {
    "unclosed bracket": ("loss:\n  rejected_weights: [1, 2\n", DPO, "line 3, column 1: not valid YAML"),
    "tab indentation": ("loss:\n\tbeta: 0.1\n", DPO, "line 2, column 1: not valid YAML"),
    "mapping value in a scalar": ("loss: beta: 0.1\n", DPO, "line 1, column 11: not valid YAML"),
    "key given twice": ("loss:\n  beta: 0.1\n  beta: 0.2\n", DPO, "line 3, column 3: not valid YAML: key 'beta'"),
    "python tag": ("loss: !!python/object/apply:os.system [echo hi]\n", DPO, "could not determine a constructor"),
    "top level a list": ("- a\n- b\n", DPO, "the top level must be a mapping"),
    "top level a scalar": ("just words\n", DPO, "the top level must be a mapping"),
    "unknown top-level key": ("lerning_rate: 0.1\n", DPO, "unknown key(s) ['lerning_rate']"),
    "unknown nested key": ("optim:\n  lr_max: 0.1\n", DPO, "optim: unknown key(s) ['lr_max']"),
    "section given a scalar": ("optim: 3\n", DPO, "optim: expected a mapping"),
    "override without =": (None, [*DPO, "loss.beta"], "is not of the form key.sub=value"),
    "override with no key": (None, [*DPO, "=1"], "is not of the form key.sub=value"),
    "unknown override": (None, [*DPO, "loss.bta=1"], "loss: unknown key(s) ['bta']"),
    "override into a scalar": (None, [*DPO, "loss.beta.x=1"], "loss.beta: expected float, got {'x': 1}"),
    "override not YAML": (None, [*DPO, "loss.rejected_weights=[1,"], "not valid YAML"),
    "int given text": (None, [*DPO, "batch_size=abc"], "batch_size: expected int"),
    "int given a fraction": (None, [*DPO, "batch_size=1.5"], "batch_size: expected int"),
    "int given a boolean": (None, [*DPO, "batch_size=true"], "batch_size: expected int"),
    "float given a list": (None, [*DPO, "loss.beta=[1]"], "loss.beta: expected float"),
    "unknown loss": (None, [*DPO, "loss.name=orpo"], "loss.name: 'orpo' is not one of"),
    "unknown layout": (None, [*DPO, "forward=fast"], "forward: 'fast' is not one of"),
    "unknown precision": (None, [*DPO, "run.mixed_precision=fp8"], "run.mixed_precision: 'fp8' is not one of"),
    "unknown schedule": (None, [*DPO, "optim.schedule=step"], "optim.schedule: 'step' is not one of"),
    "beta 0": (None, [*DPO, "loss.beta=0"], "finite beta > 0"),
    "beta negative": (None, [*DPO, "loss.beta=-1"], "finite beta > 0"),
    "beta NaN": (None, [*DPO, "loss.beta=nan"], "loss.beta: expected a finite number, got 'nan'"),
    "beta infinite": (None, [*DPO, "loss.beta=inf"], "loss.beta: expected a finite number"),
    "beta .nan in YAML": ("loss:\n  beta: .nan\n", DPO, "loss.beta: expected a finite number"),
    "lr 0": (None, [*DPO, "optim.lr=0"], "optim.lr must be a finite number > 0"),
    "lr NaN": (None, [*DPO, "optim.lr=NaN"], "optim.lr: expected a finite number"),
    "lr -inf": (None, [*DPO, "optim.lr=-inf"], "optim.lr: expected a finite number"),
    "lr overflowing": (None, [*DPO, "optim.lr=1e400"], "optim.lr: expected a finite number"),
    "lr negative": (None, [*DPO, "optim.lr=-1e-5"], "optim.lr must be a finite number > 0"),
    "projector lr NaN": (None, [*DPO, "optim.projector_lr=nan"], "optim.projector_lr: expected a finite number"),
    "weight decay negative": (None, [*DPO, "optim.weight_decay=-0.1"], "optim.weight_decay must be"),
    "warmup ratio 1": (None, [*DPO, "optim.warmup_ratio=1"], "warmup_ratio must be in [0, 1)"),
    "max_grad_norm -1": (None, [*DPO, "optim.max_grad_norm=-1"], "max_grad_norm must be a finite number > 0, or 0"),
    "max_grad_norm NaN": (None, [*DPO, "optim.max_grad_norm=nan"], "optim.max_grad_norm: expected a finite"),
    "max_grad_norm inf": (None, [*DPO, "optim.max_grad_norm=.inf"], "optim.max_grad_norm: expected a finite"),
    "grad_accum 0": (None, [*DPO, "optim.grad_accum=0"], "grad_accum must be >= 1"),
    "sft_weight negative": (None, [*DPO, "loss.sft_weight=-1"], "finite sft_weight >= 0"),
    "sft_weight NaN": (None, [*DPO, "loss.sft_weight=nan"], "loss.sft_weight: expected a finite number"),
    "loss none without SFT term": (None, [*DPO, "loss.name=none"], "loss.name=none trains nothing"),
    "label smoothing 0.5": (None, [*DPO, "loss.label_smoothing=0.5"], "0 <= label_smoothing < 0.5"),
    "rejected weight NaN": (None, [*DPO, "loss.rejected_weights=[1, nan]"], "loss.rejected_weights[1]: expected"),
    "rejected weight negative": (None, [*DPO, "loss.rejected_weights=[-1]"], "loss.rejected_weights must be"),
    "rejected weights all 0": (None, [*DPO, "loss.rejected_weights=[0, 0]"], "with at least one > 0"),
    "rejected weight infinite": (None, [*DPO, "loss.rejected_weights=[inf]"], "loss.rejected_weights[0]: expected"),
    "MM-DPO beta_k 0": (None, [*DPO, "loss.beta_k=0"], "beta_w >= 0 and beta_k > 0"),
    "batch_size 0": (None, [*DPO, "batch_size=0"], "batch_size >= 1"),
    "epochs 0": (None, [*DPO, "epochs=0"], "epochs >= 1"),
    "max_steps negative": (None, [*DPO, "max_steps=-1"], "max_steps >= 0"),
    "seed negative": (None, [*DPO, "run.seed=-1"], "run.seed must be in [0, 2**32)"),
    "seed too large": (None, [*DPO, "run.seed=4294967296"], "run.seed must be in [0, 2**32)"),
    "log_every 0": (None, [*DPO, "run.log_every=0"], "log_every >= 1"),
    "keep_checkpoints 0": (None, [*DPO, "run.keep_checkpoints=0"], "keep_checkpoints >= 1"),
    "POVID noise 0": (None, [*DPO, "povid.noise_steps=0"], "povid.noise_steps must be in 1..999"),
    "POVID weight NaN": (None, [*DPO, "povid.weight=nan"], "povid.weight: expected a finite number"),
    "merge without LoRA": (None, [*DPO, "merge_weights=true", "lora.enabled=false", "model.freeze_vision=true"],
                           "merge_weights needs lora.enabled"),
    "max_length 0": (None, [*DPO, "data.max_length=0"], "data.max_length must be >= 1"),
    "LoRA rank 0": (None, [*DPO, "lora.rank=0"], "lora needs rank >= 1"),
    "no model or data": (None, ["train", "dpo"], "model.path and data.train are required"),
    "mix_p NaN": (None, ["train", "mixed-dpo", "mix_p=nan"], "mix_p: expected a finite number"),
    "bdhs_gamma 1": (None, ["train", "online-bdhs", "bdhs_gamma=1"], "0 <= bdhs_gamma < 1"),
    "one rollout": (None, ["train", "online-dpo", "rollout.k=1"], "rollout.k must be >= 2"),
    "BDHS without input": (None, ["sample", "bdhs", "output=o.jsonl", "model=m"], "input"),
    "BDHS threshold NaN": (None, ["sample", "bdhs", "input=i", "output=o", "model=m", "bdhs.similarity_threshold=nan"],
                           "bdhs.similarity_threshold: expected a finite number"),
    "BDHS threshold above 1": (None, ["sample", "bdhs", "input=i", "output=o", "model=m",
                                      "bdhs.similarity_threshold=1.5"], "similarity_threshold must be in [-1, 1]"),
    "BDHS max_length 0": (None, ["sample", "bdhs", "input=i", "output=o", "model=m", "max_length=0"],
                          "max_length must be >= 1"),
    "BDHS output is its input": (None, ["sample", "bdhs", "input=DATA", "output=DATA", "model=m"],
                                 "is the input file itself"),
    "endpoint timeout 0": (None, ["sample", "corrupt", "input=i", "output=o", "llm.endpoint.timeout_s=0"],
                           "timeout_s > 0"),
    "lab build unknown key": (None, ["lab", "build", "size=3"], "unknown key(s) ['size']"),
}


def test_the_corpus_has_at_least_50_kinds():
    assert len(CONFIG_ERRORS) >= 50


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad_configs")
    write_records(root / "pairs.jsonl", [PreferenceRecord(f"r{i}", [], "Q?", "Yes.", ["No.", "Maybe."])
                                         for i in range(4)])
    return root


def _run(argv: list[str], yaml_text: str | None, data: Path, tmp_path: Path, capsys) -> str:
    """Run ``mmalign`` (placeholders MODEL, DATA, OUT filled in); returns stderr after asserting exit 2, one line,
    no traceback."""
    fill = {"MODEL": str(tmp_path / "no_model"), "DATA": str(data / "pairs.jsonl"), "OUT": str(tmp_path / "out")}
    argv = [next((arg.replace(k, v) for k, v in fill.items() if k in arg), arg) for arg in argv]
    if yaml_text is not None:
        (tmp_path / "cfg.yaml").write_text(yaml_text)
        argv = [*argv[:2], "--config", str(tmp_path / "cfg.yaml"), *argv[2:]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("kind", list(CONFIG_ERRORS))
def test_each_bad_config_exits_2_naming_what_is_wrong(kind, data, tmp_path, capsys):
    yaml_text, argv, message = CONFIG_ERRORS[kind]
    err = _run(argv, yaml_text, data, tmp_path, capsys)
    assert message in err, err
    if yaml_text is not None and "not valid YAML" in message:
        assert str(tmp_path / "cfg.yaml") in err


@pytest.mark.parametrize("kind, make, message", [
    ("missing config file", lambda p: p / "none.yaml", "does not exist"),
    ("config path a folder", lambda p: p, "is not a file"),
    ("config not UTF-8", lambda p: (p / "latin.yaml").write_bytes(b"loss:\n  name: caf\xe9\n") and p / "latin.yaml",
     "not valid UTF-8"),
])
def test_config_files_that_cannot_be_read(kind, make, message, data, tmp_path, capsys):
    path = make(tmp_path)
    assert main(["train", "dpo", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(path) in err and "Traceback" not in err


# Settings that only meet the data or the model at run time (the tiny model is loaded for these).
RUNTIME = {
    "model folder missing": (["model.path=NOWHERE"], "no such directory"),
    "model folder without config.json": (["model.path=EMPTY"], "not a model directory (no config.json)"),
    "data file missing": (["data.train=NOWHERE.jsonl"], "no such file"),
    "data file of unknown type": (["data.train=DATA.csv"], "unknown record file type '.csv'"),
    "batch larger than the data": (["batch_size=64"], "batch_size 64 is larger than the data (4 usable examples)"),
    "batch not divisible by the accumulation": (["batch_size=4", "optim.grad_accum=3"], "is not divisible by"),
    "fewer rejected weights than rejected answers": (["loss.rejected_weights=[1]"], "loss.rejected_weights has 1"),
    "skip listing is the training file": (["data.skip_invalid_to=DATA"], "is the training file itself"),
    "output folder is a file": (["run.output_dir=DATA"], "exists and is not a folder"),
}


@pytest.mark.parametrize("kind", list(RUNTIME))
def test_runtime_config_errors_exit_2(kind, tiny_vlm_dir, data, tmp_path, capsys):
    overrides, message = RUNTIME[kind]
    (tmp_path / "empty").mkdir()
    fill = {"NOWHERE": str(tmp_path / "nowhere"), "EMPTY": str(tmp_path / "empty"),
            "DATA": str(data / "pairs.jsonl")}
    overrides = [next((o.replace(k, v) for k, v in fill.items() if k in o), o) for o in overrides]
    argv = ["train", "dpo", f"model.path={tiny_vlm_dir('llava')}", f"data.train={data / 'pairs.jsonl'}",
            f"run.output_dir={tmp_path / 'out'}", "batch_size=2", "max_steps=1", "run.report_to=none", *overrides]
    assert main(argv) == 2
    err = capsys.readouterr().err
    reports = [line for line in err.splitlines() if line.startswith("mmalign ")]  # progress bars aside
    assert len(reports) == 1 and message in reports[0] and "Traceback" not in err, err
