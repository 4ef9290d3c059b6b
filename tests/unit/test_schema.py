"""Record format: round trips (JSONL, Parquet, datasets), provenance, and one test per validation failure."""

import base64
import io
import json
import logging
import math

import datasets
import pytest
from PIL import Image

from mmalign.data.record_files import read_records, records_from_dataset, write_records
from mmalign.data.schema import PreferenceRecord, RecordError


def _png(color=(255, 0, 0), size=(6, 4)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def root(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "red.png").write_bytes(_png())
    return tmp_path


def _good(**over):
    raw = {"id": "r1", "images": ["images/red.png"], "prompt": "<image>\nDescribe the image.",
           "chosen": "There is a red square.", "rejected": ["There is a blue circle."], "source": "t",
           "meta": {"reward_margin": 1.5}}
    raw.update(over)
    return raw


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _error(path, rows, **kwargs) -> RecordError:
    _write(path, rows)
    with pytest.raises(RecordError) as info:
        read_records(path, **kwargs)
    return info.value


def test_jsonl_round_trip_keeps_every_field(root):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is it red?"}]}]
    records = [
        PreferenceRecord("a", ["images/red.png"], "<image>\nDescribe.", "Red.", ["Blue.", "Green."], "lab",
                         {"reward_margin": 0.25, "objects": ["red square"]}),
        PreferenceRecord("b", [_png((0, 0, 255))], messages, "Yes.", []),
    ]
    write_records(root / "x.jsonl", records)
    lines = (root / "x.jsonl").read_text().splitlines()
    assert len(lines) == 2
    on_disk = json.loads(lines[1])
    assert sorted(on_disk) == sorted(["id", "images", "prompt", "chosen", "rejected", "source", "meta"])
    assert base64.b64decode(on_disk["images"][0]["bytes"]) == _png((0, 0, 255))
    assert read_records(root / "x.jsonl") == records


def test_parquet_round_trip_stores_bytes_binary(root):
    import pyarrow.parquet as pq

    records = [PreferenceRecord("a", ["images/red.png", _png((0, 255, 0))], "<image><image>\nCompare.",
                                "Left is red.", ["Both are blue."], "s", {"k": [1, 2.5, None]})]
    write_records(root / "x.parquet", records)
    table = pq.read_table(root / "x.parquet")
    assert table.column("images").to_pylist()[0] == [{"path": "images/red.png", "bytes": None},
                                                     {"path": None, "bytes": _png((0, 255, 0))}]
    assert read_records(root / "x.parquet") == records


def test_records_from_dataset_reads_image_feature_bytes_undecoded(root):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Color?"}]}]
    features = datasets.Features({
        "id": datasets.Value("string"), "images": datasets.List(datasets.Image()),
        "prompt": [{"role": datasets.Value("string"),
                    "content": [{"type": datasets.Value("string"), "text": datasets.Value("string")}]}],
        "chosen": datasets.Value("string"), "rejected": datasets.List(datasets.Value("string")),
    })
    ds = datasets.Dataset.from_dict({"id": ["d0"], "images": [[{"bytes": _png(), "path": None}]],
                                     "prompt": [messages], "chosen": ["Red."], "rejected": [["Blue."]]},
                                    features=features)
    (record,) = records_from_dataset(ds, data_root=root)
    assert record == PreferenceRecord("d0", [_png()], messages, "Red.", ["Blue."], "", {})


def test_provenance_sidecar(root):
    write_records(root / "p.jsonl", [PreferenceRecord("a", [], "Hi?", "Hello.", [])],
                  provenance={"sampler": "bdhs", "seed": 3, "model": "m", "config_hash": "abc"})
    side = json.loads((root / "p.jsonl.provenance.json").read_text())
    assert {k: side[k] for k in ("sampler", "seed", "model", "config_hash", "count")} == {
        "sampler": "bdhs", "seed": 3, "model": "m", "config_hash": "abc", "count": 1}
    assert side["created"].endswith("+00:00")
    with pytest.raises(ValueError, match="filled in by write_records"):
        write_records(root / "q.jsonl", [], provenance={"count": 5})


def test_data_root_defaults_to_file_folder_and_can_be_given(root, tmp_path_factory):
    other = tmp_path_factory.mktemp("elsewhere")
    _write(other / "x.jsonl", [_good()])
    err = pytest.raises(RecordError, read_records, other / "x.jsonl").value
    assert err.field == "images[0]" and "not found" in err.reason
    assert read_records(other / "x.jsonl", data_root=root)[0].images == ["images/red.png"]


def test_missing_image_file(root):
    err = _error(root / "x.jsonl", [_good(images=["images/gone.png"])])
    assert str(err) == (f"{root / 'x.jsonl'}, line 1, record 'r1', field 'images[0]': "
                        f"image file 'images/gone.png' not found under the data root '{root}'")


def test_corrupt_image_file(root):
    (root / "images" / "bad.png").write_bytes(_png()[:40])  # truncated: header survives, pixel data does not
    err = _error(root / "x.jsonl", [_good(images=["images/bad.png"])])
    assert (err.file, err.line, err.record_id, err.field) == (str(root / "x.jsonl"), 1, "r1", "images[0]")
    assert err.reason.startswith("image file 'images/bad.png' is unreadable or corrupt: ")


def test_corrupt_embedded_image(root):
    err = _error(root / "x.jsonl", [_good(images=[{"bytes": base64.b64encode(b"not an image").decode()}])])
    assert err.field == "images[0]"
    assert err.reason.startswith("embedded image (12 bytes) is unreadable or corrupt: cannot identify image file")


def test_invalid_base64(root):
    err = _error(root / "x.jsonl", [_good(images=[{"bytes": "@@@"}])])
    assert err.field == "images[0]" and err.reason.startswith("invalid base64")


def test_absolute_path_rejected(root):
    path = str(root / "images" / "red.png")
    err = _error(root / "x.jsonl", [_good(images=[path])])
    assert err.field == "images[0]"
    assert err.reason == f"image path {path!r} is absolute; paths must be relative to the data root"


def test_dotdot_escape_rejected_but_inner_dotdot_allowed(root):
    (root.parent / "outside.png").write_bytes(_png())
    err = _error(root / "x.jsonl", [_good(images=["../outside.png"])])
    assert err.field == "images[0]"
    assert err.reason.startswith(f"image path '../outside.png' escapes the data root '{root.resolve()}'")
    _write(root / "y.jsonl", [_good(images=["images/../images/red.png"])])
    assert len(read_records(root / "y.jsonl")) == 1


def test_symlink_out_of_root_rejected(root, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside") / "secret.png"
    outside.write_bytes(_png())
    (root / "images" / "link.png").symlink_to(outside)
    err = _error(root / "x.jsonl", [_good(images=["images/link.png"])])
    assert err.reason.startswith("image path 'images/link.png' escapes the data root")
    assert err.reason.endswith(f"(resolves to '{outside.resolve()}')")


@pytest.mark.parametrize("over, field", [
    ({"prompt": "   "}, "prompt"),
    ({"chosen": ""}, "chosen"),
    ({"rejected": ["fine", "\n"]}, "rejected[1]"),
    ({"prompt": [{"role": "user", "content": [{"type": "text", "text": ""}]}], "images": []},
     "prompt[0].content[0].text"),
])
def test_empty_text(root, over, field):
    err = _error(root / "x.jsonl", [_good(**over)])
    assert (err.field, err.reason) == (field, "empty text")


@pytest.mark.parametrize("over, field, reason", [
    ({"id": 7}, "id", "expected a string, got int"),
    ({"images": "images/red.png"}, "images", "expected a list, got str"),
    ({"images": [3]}, "images[0]", "expected a non-empty path or image bytes, got 3"),
    ({"chosen": ["a"]}, "chosen", "expected a string, got list"),
    ({"rejected": "no"}, "rejected", "expected a list, got str"),
    ({"source": None}, "source", "expected a string, got NoneType"),
    ({"meta": [1]}, "meta", "expected an object, got list"),
    ({"prompt": {"role": "user"}}, "prompt", "expected a string, got dict"),
    ({"prompt": [{"role": "robot", "content": "hi"}], "images": []}, "prompt[0].role",
     "expected one of ['system', 'user', 'assistant'], got 'robot'"),
])
def test_wrong_type(root, over, field, reason):
    err = _error(root / "x.jsonl", [_good(**over)])
    assert (err.field, err.reason) == (field, reason)


def test_too_few_rejected(root):
    err = _error(root / "x.jsonl", [_good(rejected=["Other."])], min_rejected=2)
    assert str(err) == (f"{root / 'x.jsonl'}, line 1, record 'r1', field 'rejected': "
                        "1 rejected answer(s), at least 2 required")


def test_rejected_identical_to_chosen(root):
    err = _error(root / "x.jsonl", [_good(rejected=["Other.", "There is a red square. "])])
    assert (err.field, err.reason) == ("rejected[1]", "identical to chosen")


def test_non_finite_meta_number(root):
    _write(root / "x.jsonl", ['{"id": "r1", "images": [], "prompt": "Q?", "chosen": "A.", "rejected": ["B."], '
                              '"meta": {"reward_margin": NaN}}'])
    err = pytest.raises(RecordError, read_records, root / "x.jsonl").value
    assert (err.field, err.reason) == ("meta.reward_margin", "non-finite number nan")
    err = _error(root / "y.jsonl", [_good(meta={"scores": [1.0, math.inf]})])
    assert (err.field, err.reason) == ("meta.scores[1]", "non-finite number inf")


def test_duplicate_ids(root):
    err = _error(root / "x.jsonl", [_good(), "", _good()])
    assert str(err) == f"{root / 'x.jsonl'}, line 3, record 'r1', field 'id': duplicate id (first at line 1)"


def test_unknown_and_missing_keys(root):
    err = _error(root / "x.jsonl", [_good(answer="x")])
    assert (err.field, err.reason) == (
        "answer", "unknown key(s) ['answer']; a record has only "
                  "['id', 'images', 'prompt', 'chosen', 'rejected', 'source', 'meta']")
    raw = _good()
    del raw["chosen"]
    err = _error(root / "y.jsonl", [raw])
    assert (err.field, err.reason) == ("chosen", "missing required key")


def test_invalid_json_line_has_no_id(root):
    err = _error(root / "x.jsonl", [_good(), "{not json"])
    assert str(err).startswith(f"{root / 'x.jsonl'}, line 2: not valid JSON: ")
    assert err.record_id is None and err.field is None


def test_prompt_image_count_mismatch(root):
    err = _error(root / "x.jsonl", [_good(prompt="<image><image> Compare.")])
    assert (err.field, err.reason) == ("prompt", "prompt has 2 <image> markers but the record has 1 images")


def test_skip_invalid_to_writes_reasons_and_logs_count(root, caplog):
    _write(root / "x.jsonl", [_good(id="a"), _good(id="b", chosen=""), _good(id="c"), _good(id="a")])
    with caplog.at_level(logging.WARNING):
        records = read_records(root / "x.jsonl", skip_invalid_to=root / "bad.jsonl")
    assert [r.id for r in records] == ["a", "c"]
    bad = [json.loads(line) for line in (root / "bad.jsonl").read_text().splitlines()]
    assert bad == [
        {"file": str(root / "x.jsonl"), "line": 2, "id": "b", "field": "chosen", "reason": "empty text"},
        {"file": str(root / "x.jsonl"), "line": 4, "id": "a", "field": "id",
         "reason": "duplicate id (first at line 1)"},
    ]
    assert "skipped 2 invalid record(s)" in caplog.text


def test_write_records_refuses_invalid_record(root):
    with pytest.raises(RecordError) as info:
        write_records(root / "w.jsonl", [PreferenceRecord("a", [], "Q?", "A.", ["A."])])
    assert str(info.value) == f"{root / 'w.jsonl'}, line 1, record 'a', field 'rejected[0]': identical to chosen"
    assert not (root / "w.jsonl").exists()


def test_cli_validate_exit_codes_and_skip_file(root, capsys):
    from mmalign.cli.main import main

    _write(root / "ok.jsonl", [_good(id="a"), _good(id="b", rejected=["x", "y"])])
    assert main(["data", "validate", str(root / "ok.jsonl"), "--min-rejected", "1"]) == 0
    assert capsys.readouterr().out.strip() == f"{root / 'ok.jsonl'}: 2 valid record(s), 1-2 rejected each; 0 invalid"
    assert main(["data", "validate", str(root / "ok.jsonl"), "--min-rejected", "2"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"mmalign data validate: invalid record: {root / 'ok.jsonl'}, line 1, record 'a', field 'rejected': "
        "1 rejected answer(s), at least 2 required")
    assert main(["data", "validate", str(root / "ok.jsonl"), "--min-rejected", "2",
                 "--skip-invalid-to", str(root / "bad.jsonl")]) == 2
    assert [json.loads(x)["id"] for x in (root / "bad.jsonl").read_text().splitlines()] == ["a"]


def test_dataset_and_parquet_errors_name_the_row(root):
    import pyarrow as pa
    import pyarrow.parquet as pq

    ds = datasets.Dataset.from_list([_good(id="a", images=[]), _good(id="b", images=[], chosen=" ")])
    ds = ds.map(lambda row: {"prompt": "Describe the image."})
    err = pytest.raises(RecordError, records_from_dataset, ds, data_root=root, name="hub:x").value
    assert str(err) == "hub:x, line 2, record 'b', field 'chosen': empty text"
    write_records(root / "x.parquet", [PreferenceRecord("a", [], "Q?", "A.", [])])
    table = pq.read_table(root / "x.parquet")
    table = table.set_column(table.schema.get_field_index("prompt"), "prompt", pa.array(["not json"]))
    pq.write_table(table, root / "y.parquet")
    err = pytest.raises(RecordError, read_records, root / "y.parquet").value
    assert (err.line, err.record_id, err.field) == (1, "a", "prompt")
    assert err.reason.startswith("not valid JSON text")


def test_provenance_that_is_not_json_leaves_no_file(root):
    with pytest.raises(TypeError):
        write_records(root / "p.jsonl", [], provenance={"path": root})
    assert not (root / "p.jsonl").exists()


def test_shared_image_file_is_decoded_once_per_read(root, monkeypatch):
    import mmalign.data.schema as schema

    opened = []
    real_open = schema.open_image
    monkeypatch.setattr(schema, "open_image", lambda ref, data_root: opened.append(ref) or real_open(ref, data_root))
    _write(root / "x.jsonl", [_good(id=str(i)) for i in range(5)])
    assert len(read_records(root / "x.jsonl")) == 5
    assert opened == ["images/red.png"]


@pytest.mark.parametrize(("meta", "field", "reason"), [
    ({"reward_margins": [1.0, 2.0]}, "meta.reward_margins", "2 value(s) for 1 rejected answer(s)"),
    ({"reward_margins": 1.5}, "meta.reward_margins", "expected a list with one number per rejected answer, got float"),
    ({"reward_margins": [True]}, "meta.reward_margins[0]", "expected a number, got bool"),
    ({"critiques": {"chosen": "Right."}}, "meta.critiques.rejected", "missing required key"),
    ({"critiques": {"chosen": "Right.", "rejected": [" "]}}, "meta.critiques.rejected[0]", "empty text"),
    ({"rewards": {"chosen": "high", "rejected": [0.5]}}, "meta.rewards.chosen", "expected a number, got str"),
])
def test_per_slot_meta_has_one_entry_per_rejected_answer(root, meta, field, reason):
    err = _error(root / "slots.jsonl", [_good(meta=meta)])
    assert (err.line, err.record_id, err.field, err.reason) == (1, "r1", field, reason)
