"""RecordSet: the one rule for where a record file's images live, and the reads/hashes built on it."""

from __future__ import annotations

import hashlib
import io

from PIL import Image

from mmalign.data.record_files import write_records
from mmalign.data.record_set import RecordSet, file_sha256
from mmalign.data.schema import PreferenceRecord


def _png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_root_is_data_root_else_the_files_folder(tmp_path):
    assert RecordSet.at(tmp_path / "a" / "r.jsonl").root == tmp_path / "a"
    assert RecordSet.at(tmp_path / "a" / "r.jsonl", "").root == tmp_path / "a"  # "" (a YAML default) = not given
    assert RecordSet.at(tmp_path / "a" / "r.jsonl", tmp_path / "img").root == tmp_path / "img"


def test_reads_opens_and_hashes_images_under_its_root(tmp_path):
    (tmp_path / "img").mkdir()
    red = _png((255, 0, 0))
    (tmp_path / "img" / "x.png").write_bytes(red)
    records = [PreferenceRecord("r1", ["x.png", _png((0, 0, 255))], "<image><image> What?", "A.", ["B."])]
    write_records(tmp_path / "data" / "r.jsonl", records)
    dataset = RecordSet.at(tmp_path / "data" / "r.jsonl", tmp_path / "img")
    (record,) = dataset.read(min_rejected=1)
    images = dataset.images(record)
    assert [im.getpixel((0, 0)) for im in images] == [(255, 0, 0), (0, 0, 255)]
    assert dataset.image_hashes(record)[0] == hashlib.sha256(red).hexdigest()
    provenance = dataset.provenance()
    assert provenance["data_root"] == str((tmp_path / "img").resolve())
    assert provenance["file_sha256"] == hashlib.sha256((tmp_path / "data" / "r.jsonl").read_bytes()).hexdigest()


def test_file_sha256_reads_in_chunks(tmp_path):
    data = bytes(range(256)) * 1000
    (tmp_path / "f").write_bytes(data)
    assert file_sha256(tmp_path / "f", chunk=1000) == hashlib.sha256(data).hexdigest()
