"""Converters: each fixture layout under tests/assets/data -> records checked field by field."""

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mmalign.data.record_files import read_records, write_records
from mmalign.data.schema import PreferenceRecord, RecordError
from mmalign.data.source_files import convert_file

ASSETS = Path(__file__).parents[1] / "assets" / "data"
USER_IMAGE = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is it red?"}]}


def test_trl_text_conversational_and_implicit_prompt():
    records = convert_file(ASSETS / "trl.jsonl", "trl")
    assert records == [
        PreferenceRecord("t0", ["images/red.png"], "<image>\nWhat color is the square?", "Red.", ["Blue."], "trl"),
        PreferenceRecord("trl-trl-2", ["images/blue.png"],
                         [{"role": "user", "content": [{"type": "image"},
                                                       {"type": "text", "text": "Describe the image."}]}],
                         "A blue square.", ["A red circle."], "trl"),
        PreferenceRecord("t2", ["images/red.png"], [USER_IMAGE], "Yes.", ["No."], "trl"),
        # String content with no image part: the images go first in the first user message (TRL's rule).
        PreferenceRecord("t3", ["images/red.png", "images/blue.png"],
                         [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                                       {"type": "text", "text": "Which is red?"}]}],
                         "The first.", ["The second."], "trl"),
    ]


def test_trl_parquet_with_embedded_image_bytes(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (5, 5), (0, 255, 0)).save(buf, "PNG")
    table = pa.table({"images": [[{"bytes": buf.getvalue(), "path": "orig.png"}]], "prompt": ["Color?"],
                      "chosen": ["Green."], "rejected": ["Pink."]})
    pq.write_table(table, tmp_path / "trl.parquet")
    (record,) = convert_file(tmp_path / "trl.parquet", "trl")
    assert record == PreferenceRecord("trl-trl-1", [buf.getvalue()], "Color?", "Green.", ["Pink."], "trl")


def test_povid():
    (record,) = convert_file(ASSETS / "povid.json", "povid")
    assert record == PreferenceRecord("p0", ["images/red.png"], "<image>\nDescribe this image in detail.",
                                      "A red square on a plain background.",
                                      ["A red square next to a green dog."], "povid")


def test_rlhf_v_meta_and_image_path():
    (record,) = convert_file(ASSETS / "rlhf_v.jsonl", "rlhf_v")
    assert record == PreferenceRecord(
        "17", ["images/blue.png"], "What is in the image?", "A blue square.", ["A blue square and a cat."],
        "rlhf_v", {"origin_dataset": "OK-VQA",
                   "origin_split": '{"model": "OmniLMM-12B", "type": "detailed_description"}',
                   "idx": 17, "image_path": "OK-VQA/train/blue.png"})


def test_vlfeedback_pairs_with_rating_margins():
    records = convert_file(ASSETS / "vlfeedback.jsonl", "vlfeedback")
    # v0: m-c has an "N/A" rating and is left out; m-a (mean 4.5) beats m-b (mean 1.5).
    # v1: means 4, 3, 1; "One." vs "One." (0 vs 2) is identical text and is left out.
    assert [(r.id, r.chosen, r.rejected, r.meta["reward_margins"]) for r in records] == [
        ("v0-0-1", "A red square.", ["A red car."], [3.0]),
        ("v1-0-1", "One.", ["Two."], [1.0]),
        ("v1-1-2", "Two.", ["One."], [2.0]),
    ]
    assert records[0] == PreferenceRecord(
        "v0-0-1", ["images/red.png"], "What is shown?", "A red square.", ["A red car."], "vlfeedback",
        {"reward_margins": [3.0], "chosen_rating": 4.5, "rejected_rating": 1.5,
         "chosen_model": "m-a", "rejected_model": "m-b"})


def test_llava_rlhf_preference_and_multi_turn_context():
    first, second = convert_file(ASSETS / "llava_rlhf.json", "llava_rlhf")
    assert first == PreferenceRecord("h0", ["images/red.png"], "<image>\nWhat shape is it?", "A square.",
                                     ["A circle."], "llava_rlhf")
    assert second == PreferenceRecord(
        "h1", ["images/blue.png"],
        [{"role": "user", "content": [{"type": "text", "text": "What color is it?"}, {"type": "image"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "Blue."}]},
         {"role": "user", "content": [{"type": "text", "text": "Anything else?"}]}],
        "No, only the square.", ["A yellow bird."], "llava_rlhf")


def test_llava_sft_one_record_per_answer():
    records = convert_file(ASSETS / "llava_sft.json", "llava_sft")
    assert records == [
        PreferenceRecord("s0-0", ["images/red.png"], "<image>\nWhat color is the square?", "Red.", [],
                         "llava_sft"),
        PreferenceRecord("s0-1", ["images/red.png"],
                         [{"role": "user", "content": [{"type": "image"},
                                                       {"type": "text", "text": "What color is the square?"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "Red."}]},
                          {"role": "user", "content": [{"type": "text", "text": "How many squares?"}]}],
                         "One.", [], "llava_sft"),
        PreferenceRecord("s1-0", [], "Say hello.", "Hello.", [], "llava_sft"),
    ]


@pytest.mark.parametrize("fmt, name", [("trl", "trl.jsonl"), ("povid", "povid.json"), ("rlhf_v", "rlhf_v.jsonl"),
                                       ("vlfeedback", "vlfeedback.jsonl"), ("llava_rlhf", "llava_rlhf.json"),
                                       ("llava_sft", "llava_sft.json")])
def test_converted_records_pass_validation_after_a_round_trip(tmp_path, fmt, name):
    records = convert_file(ASSETS / name, fmt)
    write_records(tmp_path / "out.jsonl", records)
    assert read_records(tmp_path / "out.jsonl", data_root=ASSETS) == records


def test_missing_source_field_names_file_row_and_field(tmp_path):
    rows = json.loads((ASSETS / "povid.json").read_text())
    del rows[0]["rejected_conversations"]
    (tmp_path / "povid.json").write_text(json.dumps(rows))
    with pytest.raises(RecordError) as info:
        convert_file(tmp_path / "povid.json", "povid")
    assert str(info.value) == (f"{tmp_path / 'povid.json'}, line 1, record 'p0', "
                               "field 'rejected_conversations': missing in the source row")


def test_llava_rlhf_bad_preference(tmp_path):
    rows = json.loads((ASSETS / "llava_rlhf.json").read_text())
    rows[1]["preference"] = 3
    (tmp_path / "h.json").write_text(json.dumps(rows))
    with pytest.raises(RecordError) as info:
        convert_file(tmp_path / "h.json", "llava_rlhf")
    assert (info.value.line, info.value.record_id, info.value.field, info.value.reason) == (
        2, "h1", "preference", "expected 1 or 2, got 3")


def test_unknown_format():
    with pytest.raises(ValueError, match="unknown source format 'nope'"):
        convert_file(ASSETS / "povid.json", "nope")


def test_cli_convert_writes_records_and_provenance(tmp_path, capsys):
    from mmalign.cli.main import main

    out = tmp_path / "pairs.jsonl"
    assert main(["data", "convert", "--format", "llava_rlhf", str(ASSETS / "llava_rlhf.json"), str(out)]) == 0
    assert read_records(out, data_root=ASSETS) == convert_file(ASSETS / "llava_rlhf.json", "llava_rlhf")
    side = json.loads((tmp_path / "pairs.jsonl.provenance.json").read_text())
    assert (side["source"], side["count"], side["data_root"]) == ("llava_rlhf", 2, str(ASSETS.resolve()))
    assert capsys.readouterr().out.strip() == f"{out}: 2 record(s) written; 0 invalid"


def test_cli_convert_reports_bad_rows_without_traceback(tmp_path, capsys):
    from mmalign.cli.main import main

    bad = tmp_path / "sft.json"
    bad.write_text(json.dumps([{"id": "x", "conversations": [{"from": "gpt", "value": "Hi."}]}]))
    assert main(["data", "convert", "--format", "llava_sft", str(bad), str(tmp_path / "o.jsonl")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"mmalign data convert: invalid source row or record: {bad}, line 1, record 'x', "
        "field 'conversations': an answer must follow a human turn")
