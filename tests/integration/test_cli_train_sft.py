"""``mmalign train sft`` on user records with a local model folder, through the command line: the model trains
(loss logged under both override spellings), saves a loadable model, and ``--resume`` continues the run."""

import json

import pytest
from PIL import Image

from mmalign.cli.main import main
from mmalign.data.record_files import write_records
from mmalign.data.schema import PreferenceRecord
from mmalign.models.loading import load_vlm

pytestmark = pytest.mark.integration


@pytest.fixture()
def records(tmp_path):
    colours = {"red": (220, 30, 30), "blue": (30, 30, 220)}
    recs = []
    for i in range(8):
        name = list(colours)[i % 2]
        Image.new("RGB", (32, 32), colours[name]).save(tmp_path / f"img{i}.png")
        recs.append(PreferenceRecord(f"r{i}", [f"img{i}.png"], "<image>\nWhat colour is the square?",
                                     f"The square is {name}.", []))
    path = tmp_path / "sft.jsonl"
    write_records(path, recs)
    return path


def test_train_sft_from_the_command_line(tiny_vlm_dir, records, tmp_path):
    out = tmp_path / "run"
    argv = ["train", "sft", "--model", str(tiny_vlm_dir("llava")), f"data={records}", "--batch_size", "4",
            "--steps=3", "--run.output_dir", str(out), "--report_to", "none", "--logging_steps", "1",
            "--save_steps", "2", "--max_length", "256"]
    assert main(argv) == 0
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and losses[-1] < losses[0]
    model, _ = load_vlm(out)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    saved = (out / "config.yaml").read_text()
    assert "path: " + str(tiny_vlm_dir("llava")) in saved and "steps: 3" in saved
    # a longer run resumes from the last checkpoint instead of starting again: the first run's lines (with
    # their timings) stay as they were and one step is added
    first = (out / "metrics.jsonl").read_text().splitlines()
    longer = [a if a != "--steps=3" else "--steps=4" for a in argv]
    assert main([*longer, "--resume"]) == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert lines[:3] == first and [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]
