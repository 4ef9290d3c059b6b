"""Published layouts as they ship, streamed: RLAIF-V, VLFeedback without img_path, TRL shards without ids,
LLaMA-Factory / ms-swift sharegpt, ``datasets`` rows and folders, and mmalign's Parquet through ``datasets``."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from datasets import Dataset, Features, Image as ImageFeature, Value, load_dataset
from PIL import Image

from mmalign.data.record_files import read_records, records_from_dataset, write_records
from mmalign.data.schema import PreferenceRecord, RecordError
from mmalign.data.source_files import convert_file, convert_inputs, convert_rows, iter_json_array

ASSETS = Path(__file__).parents[1] / "assets" / "data"
RED = (ASSETS / "images" / "red.png").read_bytes()
BLUE = (ASSETS / "images" / "blue.png").read_bytes()


def test_rlaif_v_flat_columns_from_every_shard():
    shards = sorted((ASSETS / "rlaif_v").glob("*.parquet"))
    records = list(convert_inputs(shards, "rlaif_v", data_root=ASSETS))
    assert [r.id for r in records] == ["OK-VQA_0", "COCO_1", "VQAv2_2"]
    first = records[0]
    assert (first.images, first.prompt, first.chosen, first.rejected, first.source) == (
        [RED], "What color is the square?", "The square is red.", ["The square is blue."], "rlaif_v")
    assert first.meta["origin_dataset"] == "OK-VQA" and json.loads(first.meta["origin_split"])["model"] == "OmniLMM-12B"


def test_trl_shards_without_ids_get_ids_unique_across_shards_and_stable_per_shard():
    shards = sorted((ASSETS / "trl_shards").glob("*.parquet"))
    together = list(convert_inputs(shards, "trl", data_root=ASSETS))
    assert [r.id for r in together] == ["trl-train-00000-of-00002-1", "trl-train-00001-of-00002-1"]
    alone = list(convert_inputs(shards[1:], "trl", data_root=ASSETS))
    assert alone == together[1:]  # converting one shard alone gives the same id
    assert together[0].prompt == [{"role": "user", "content": [{"type": "image"},
                                                               {"type": "text", "text": "What color is it?"}]}]


def test_inputs_with_the_same_name_are_refused(tmp_path):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "train.jsonl").write_text((ASSETS / "trl.jsonl").read_text())
    with pytest.raises(ValueError, match=r"share the name\(s\) \['train'\]"):
        list(convert_inputs([tmp_path / "a" / "train.jsonl", tmp_path / "b" / "train.jsonl"], "trl", data_root=ASSETS))


def test_vlfeedback_as_published_takes_the_image_from_merged_images():
    records = list(convert_inputs([ASSETS / "vlfeedback_80k.jsonl"], "vlfeedback", data_root=ASSETS))
    # The N/A-rated completion of the second row cannot be ranked, so that row gives no pair.
    assert [(r.id, r.images, r.chosen, r.rejected) for r in records] == [
        ("svit-conversation-2-0-1", ["merged_images/svit-conversation-2.jpg"], "The square is red.",
         ["The square is green."])]
    assert records[0].meta["chosen_model"] == "gpt-4v"


def test_llamafactory_sharegpt_ranking():
    first, second = convert_file(ASSETS / "llamafactory_ranking.json", "llamafactory")
    assert first == PreferenceRecord("llamafactory-llamafactory_ranking-1", ["images/red.png"],
                                     "<image>What color is the square?", "Red.", ["Green."], "llamafactory")
    assert second.prompt == [
        {"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A square."}]},
        {"role": "user", "content": [{"type": "text", "text": "Which colour?"}]}]
    assert (second.chosen, second.rejected) == ("Blue.", ["Yellow."])


def test_swift_dpo_messages_and_rejected_response():
    first, second = list(convert_inputs([ASSETS / "swift_dpo.jsonl"], "swift", data_root=ASSETS))
    assert (first.prompt, first.chosen, first.rejected) == ("<image>What colour is the square?", "It is red.",
                                                            ["It is purple."])
    assert second.images == ["images/red.png", "images/blue.png"]
    assert second.prompt[1]["content"] == [{"type": "image"}, {"type": "image"},
                                          {"type": "text", "text": "Which image is blue?"}]


def test_swift_row_without_a_final_answer_names_the_field(tmp_path):
    (tmp_path / "s.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"}],
                                                  "rejected_response": "x"}) + "\n")
    with pytest.raises(RecordError, match=r"s.jsonl, line 1, field 'messages': expected a user turn"):
        list(convert_inputs([tmp_path / "s.jsonl"], "swift", data_root=tmp_path))


def _rlaif_dataset() -> Dataset:
    features = Features({"image": ImageFeature(), "question": Value("string"), "chosen": Value("string"),
                         "rejected": Value("string"), "idx": Value("string")})
    return Dataset.from_dict({"image": [{"bytes": RED, "path": None}], "question": ["Colour?"],
                              "chosen": ["Red."], "rejected": ["Blue."], "idx": ["k0"]}, features=features)


def test_datasets_rows_with_decoded_pil_images_are_accepted():
    ds = _rlaif_dataset()
    assert isinstance(ds[0]["image"], Image.Image)  # what load_dataset hands a user
    ((_, record),) = convert_rows(enumerate(ds, start=1), "rlaif_v", name="hub")
    decoded = Image.open(io.BytesIO(record.images[0]))
    assert decoded.format == "PNG" and decoded.convert("RGB").tobytes() == Image.open(
        ASSETS / "images" / "red.png").convert("RGB").tobytes()


def test_datasets_folder_is_read_without_decoding_images(tmp_path):
    _rlaif_dataset().save_to_disk(str(tmp_path / "rlaif"))
    (record,) = convert_inputs([tmp_path / "rlaif"], "rlaif_v", data_root=tmp_path)
    assert record.images == [RED]  # the stored bytes, not a re-encoding


def test_mmalign_parquet_round_trips_through_datasets(tmp_path):
    records = [PreferenceRecord("a", ["images/red.png"], "<image> Colour?", "Red.", ["Blue."], "x",
                                {"reward_margin": 1.5, "tags": ["k"]}),
               PreferenceRecord("b", [BLUE], [{"role": "user", "content": [{"type": "image"},
                                                                           {"type": "text", "text": "Shape?"}]}],
                                "Square.", ["Circle."], "x", {})]
    write_records(tmp_path / "r.parquet", records)
    ds = load_dataset("parquet", data_files=str(tmp_path / "r.parquet"), split="train")
    assert records_from_dataset(ds, data_root=ASSETS) == records == read_records(tmp_path / "r.parquet",
                                                                                 data_root=ASSETS)


def test_json_array_is_parsed_element_by_element(tmp_path):
    rows = [{"id": i, "text": "x" * (i * 7), "nested": [1, {"a": "]"}]} for i in range(50)]
    (tmp_path / "a.json").write_text(json.dumps(rows, indent=1))
    assert [row for _, row in iter_json_array(tmp_path / "a.json", chunk=16)] == rows
    (tmp_path / "cut.json").write_text(json.dumps(rows)[:-30])
    with pytest.raises(RecordError, match="cut.json"):
        list(iter_json_array(tmp_path / "cut.json", chunk=16))


def test_skipped_rows_and_records_are_reported_and_the_rest_kept(tmp_path):
    rows = [json.loads(line) for line in (ASSETS / "swift_dpo.jsonl").read_text().splitlines()]
    rows.insert(1, {"messages": "oops", "rejected_response": "x"})
    rows.append(dict(rows[0], rejected_response="It is red."))  # rejected == chosen: a record error
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    errors: list[RecordError] = []
    kept = list(convert_inputs([tmp_path / "s.jsonl"], "swift", data_root=ASSETS, on_invalid=errors.append))
    assert len(kept) == 2
    assert [(e.line, e.field) for e in errors] == [(2, "messages"), (4, "rejected[0]")]


def test_cli_converts_many_shards_into_one_file(tmp_path, capsys):
    from mmalign.cli.main import main

    shards = sorted(str(p) for p in (ASSETS / "rlaif_v").glob("*.parquet"))
    out = tmp_path / "pairs.parquet"
    assert main(["data", "convert", "--format", "rlaif_v", *shards, str(out)]) == 0
    assert [r.id for r in read_records(out)] == ["OK-VQA_0", "COCO_1", "VQAv2_2"]
    side = json.loads((tmp_path / "pairs.parquet.provenance.json").read_text())
    assert side["count"] == 3 and len(side["converted_from"]) == len(side["input_sha256"]) == 2
    assert capsys.readouterr().out.strip() == f"{out}: 3 record(s) written; 0 invalid"

