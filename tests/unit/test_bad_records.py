"""The bad-record corpus: 72 kinds of broken record lines, each refused with file, line, record and field named
(exit code 2 from ``mmalign data validate``, no traceback), and all of them in one file with good records in
between: with ``--skip-invalid-to`` every good record is kept and every bad one listed, in training too."""

from __future__ import annotations

import base64
import io
import json
import os
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from mmalign.cli.main import main
from mmalign.data.collate import collate_preference
from mmalign.data.record_files import read_records
from mmalign.data.schema import RecordError
from mmalign.trainers.preference_data import DataConfig, load_pairs

GOOD = {"id": "good", "images": ["images/ok.png"], "prompt": "<image>\nWhat colour is it?", "chosen": "Red.",
        "rejected": ["Blue."], "source": "test", "meta": {"margin": 1.0}}


def _png(size=(8, 8), colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG declaring ``width`` x ``height`` pixels in a few dozen bytes (its pixel data is never reached)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + \
        chunk(b"IEND", b"")


def _line(**over) -> bytes:
    return json.dumps(GOOD | over).encode()


def _without(key: str) -> bytes:
    return json.dumps({k: v for k, v in GOOD.items() if k != key}).encode()


def _raw(text: str) -> bytes:
    """A line spliced from text (for what json.dumps cannot write: escapes of lone surrogates, NaN, ...)."""
    return text.encode()


B64_TEXT = base64.b64encode(b"not an image at all").decode()

# kind -> (line bytes, the field the error names, a piece of the reason)
BAD: dict[str, tuple[bytes, str | None, str]] = {
    "truncated JSON": (b'{"id": "x", "images": [', None, "not valid JSON"),
    "trailing garbage": (_line() + b" extra", None, "not valid JSON"),
    "JSON array": (b"[1, 2, 3]", None, "expected a JSON object"),
    "JSON string": (b'"just text"', None, "expected a JSON object"),
    "JSON number": (b"42", None, "expected a JSON object"),
    "JSON null": (b"null", None, "expected a JSON object"),
    "non-UTF-8 byte": (_line(chosen="Red").replace(b"Red", b"R\xffd"), None, "not valid UTF-8"),
    "Latin-1 text": (_line(chosen="caf").replace(b"caf", b"caf\xe9"), None, "not valid UTF-8"),
    "deeply nested JSON": (_raw('{"id": "deep", "meta": {"x": ' + "[" * 100_000 + "]" * 100_000 + "}}"), None,
                           "nested too deeply"),
    "integer too long": (_raw('{"id": "big", "meta": {"n": ' + "9" * 5000 + "}}"), None, "not valid JSON"),
    "key given twice": (_raw('{"id": "a", "id": "b"}'), "id", "key given twice"),
    "NaN as chosen": (_raw(_line().decode().replace('"Red."', "NaN")), "chosen", "expected a string"),
    "unknown key": (_line(score=3), "score", "unknown key"),
    "missing id": (_without("id"), "id", "missing required key"),
    "missing images": (_without("images"), "images", "missing required key"),
    "missing prompt": (_without("prompt"), "prompt", "missing required key"),
    "missing chosen": (_without("chosen"), "chosen", "missing required key"),
    "missing rejected": (_without("rejected"), "rejected", "missing required key"),
    "id not a string": (_line(id=7), "id", "expected a string"),
    "empty id": (_line(id=""), "id", "empty text"),
    "blank id": (_line(id="  "), "id", "empty text"),
    "lone surrogate in id": (_raw(_line(id="ID").decode().replace('"ID"', '"\\ud800x"')), "id", "lone surrogate"),
    "duplicate id": (_line(id="good-0"), "id", "duplicate id"),
    "images not a list": (_line(images="images/ok.png"), "images", "expected a list"),
    "image ref a number": (_line(images=[3]), "images[0]", "non-empty path or image bytes"),
    "image ref empty": (_line(images=[""]), "images[0]", "non-empty path or image bytes"),
    "image ref null": (_line(images=[None]), "images[0]", "non-empty path or image bytes"),
    "absolute image path": (_line(images=["/etc/hostname"]), "images[0]", "is absolute"),
    "image path escaping the root": (_line(images=["../outside.png"]), "images[0]", "escapes the data root"),
    "symlink out of the root": (_line(images=["images/link.png"]), "images[0]", "escapes the data root"),
    "missing image file": (_line(images=["images/none.png"]), "images[0]", "not found"),
    "image path is a folder": (_line(images=["images/folder.png"]), "images[0]", "not found"),
    "NUL in image path": (_line(images=["images/ok.png\x00.txt"]), "images[0]", "NUL character"),
    "lone surrogate in image path": (_raw(_line(images=["IMG"]).decode().replace('"IMG"', '"images/\\udc80.png"')),
                                     "images[0]", "lone surrogate"),
    "image name too long": (_line(images=["images/" + "x" * 300 + ".png"]), "images[0]", "cannot be read"),
    "corrupt image": (_line(images=["images/noise.png"]), "images[0]", "unreadable or corrupt"),
    "truncated image": (_line(images=["images/truncated.png"]), "images[0]", "unreadable or corrupt"),
    "text file as image": (_line(images=["images/notes.png"]), "images[0]", "unreadable or corrupt"),
    "12000 x 12000 PNG of a few bytes": (_line(images=["images/bomb.png"]), "images[0]", "144,000,000 pixels"),
    "8000 x 7000 PNG": (_line(images=["images/large.png"]), "images[0]", "more than the limit of 50,000,000"),
    "embedded image bad base64": (_line(images=[{"bytes": "@@@"}]), "images[0]", "invalid base64"),
    "embedded image wrong keys": (_line(images=[{"data": "AAAA"}]), "images[0]", "an embedded image is"),
    "embedded bytes not an image": (_line(images=[{"bytes": B64_TEXT}]), "images[0]", "unreadable or corrupt"),
    "prompt a number": (_line(prompt=5), "prompt", "expected a string"),
    "empty prompt": (_line(prompt="", images=[]), "prompt", "empty text"),
    "blank prompt": (_line(prompt=" \n ", images=[]), "prompt", "empty text"),
    "lone surrogate in prompt": (_raw(_line(prompt="P", images=[]).decode().replace('"P"', '"Why \\udfff?"')),
                                 "prompt", "lone surrogate"),
    "no messages": (_line(prompt=[], images=[]), "prompt", "empty message list"),
    "message not an object": (_line(prompt=["hi"], images=[]), "prompt[0]", "a message object"),
    "message with extra key": (_line(prompt=[{"role": "user", "content": "Hi?", "name": "x"}], images=[]),
                               "prompt[0]", "exactly the keys"),
    "unknown role": (_line(prompt=[{"role": "robot", "content": "Hi?"}], images=[]), "prompt[0].role",
                     "expected one of"),
    "empty content list": (_line(prompt=[{"role": "user", "content": []}], images=[]), "prompt[0].content",
                           "empty content list"),
    "content part of unknown type": (_line(prompt=[{"role": "user", "content": [{"type": "video"}]}], images=[]),
                                     "prompt[0].content[0].type", "expected 'text' or 'image'"),
    "empty text part": (_line(prompt=[{"role": "user", "content": [{"type": "text", "text": ""}]}], images=[]),
                        "prompt[0].content[0].text", "empty text"),
    "image part with a url": (_line(prompt=[{"role": "user", "content": [{"type": "image", "url": "x"}]}]),
                              "prompt[0].content[0]", "image parts carry only"),
    "last turn not the user's": (_line(prompt=[{"role": "user", "content": "Hi?"},
                                               {"role": "assistant", "content": "Hello."}], images=[]),
                                 "prompt[1].role", "the last message must be the user's turn"),
    "more image markers than images": (_line(prompt="<image><image>\nSame?"), "prompt", "image"),
    "chosen a number": (_line(chosen=1), "chosen", "expected a string"),
    "empty chosen": (_line(chosen=""), "chosen", "empty text"),
    "chosen null": (_line(chosen=None), "chosen", "expected a string"),
    "lone surrogate in chosen": (_raw(_line(chosen="C").decode().replace('"C"', '"Red \\ud83d."')), "chosen",
                                 "lone surrogate"),
    "rejected not a list": (_line(rejected="Blue."), "rejected", "expected a list"),
    "rejected answer a number": (_line(rejected=[2]), "rejected[0]", "expected a string"),
    "empty rejected answer": (_line(rejected=["Blue.", " "]), "rejected[1]", "empty text"),
    "rejected equal to chosen": (_line(rejected=["Red. "]), "rejected[0]", "identical to chosen"),
    "lone surrogate in rejected": (_raw(_line(rejected=["R"]).decode().replace('"R"', '"\\udc00"')), "rejected[0]",
                                   "lone surrogate"),
    "source a number": (_line(source=1), "source", "expected a string"),
    "lone surrogate in source": (_raw(_line(source="S").decode().replace('"S"', '"\\ud800"')), "source",
                                 "lone surrogate"),
    "meta a list": (_line(meta=[1]), "meta", "expected an object"),
    "NaN in meta": (_raw(_line(meta={"m": 0}).decode().replace('"m": 0', '"m": NaN')), "meta.m", "non-finite"),
    "Infinity deep in meta": (_raw(_line(meta={"a": [{"b": 0}]}).decode().replace('"b": 0', '"b": -Infinity')),
                              "meta.a[0].b", "non-finite"),
    "lone surrogate in a meta key": (_raw(_line(meta={"K": 1}).decode().replace('"K"', '"\\ud800"')), "meta key",
                                     "lone surrogate"),
    "lone surrogate in a meta string": (_raw(_line(meta={"k": "V"}).decode().replace('"V"', '"\\ud800"')), "meta.k",
                                        "lone surrogate"),
}


def test_the_corpus_has_at_least_60_kinds():
    assert len(BAD) >= 60


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad_records")
    images = root / "images"
    images.mkdir()
    (images / "ok.png").write_bytes(_png())
    (images / "noise.png").write_bytes(os.urandom(256))
    (images / "truncated.png").write_bytes(_png((64, 64))[:60])
    (images / "notes.png").write_text("just some notes\n")
    (images / "bomb.png").write_bytes(_png_header_only(12000, 12000))
    (images / "large.png").write_bytes(_png_header_only(8000, 7000))
    (images / "folder.png").mkdir()
    outside = tmp_path_factory.mktemp("outside") / "secret.png"
    outside.write_bytes(_png())
    (images / "link.png").symlink_to(outside)
    return root


def _file(root: Path, name: str, lines: list[bytes]) -> Path:
    path = root / name
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def _good(i: int) -> bytes:
    return _line(id=f"good-{i}")


@pytest.mark.parametrize("kind", list(BAD))
def test_each_bad_record_is_named_by_file_line_record_and_field(root, kind, capsys):
    line, field, reason = BAD[kind]
    path = _file(root, f"{abs(hash(kind))}.jsonl", [_good(0), line, _good(1)])
    with pytest.raises(RecordError) as info:
        read_records(path)
    err = info.value
    assert (err.file, err.line, err.field) == (str(path), 2, field), str(err)
    assert reason in err.reason, str(err)
    assert main(["data", "validate", str(path)]) == 2
    out = capsys.readouterr()
    assert out.err.count("\n") == 1 and f"{path}, line 2" in out.err and "Traceback" not in out.err
    if field is not None:
        assert f"field {field!r}" in out.err


@pytest.fixture(scope="module")
def corpus(root) -> tuple[Path, list[str]]:
    """Every bad kind, each followed by a good record; a byte-order mark opens the file (and is accepted)."""
    lines, good = [], []
    for i, (line, _, _) in enumerate(BAD.values()):
        lines += [_good(i), line]
        good.append(f"good-{i}")
    lines[0] = "\ufeff".encode() + lines[0]
    return _file(root, "corpus.jsonl", lines), good


def test_skip_invalid_to_keeps_every_good_record_and_lists_every_bad_one(corpus, root, capsys):
    path, good = corpus
    skipped = root / "out" / "skipped.jsonl"
    records = read_records(path, skip_invalid_to=skipped)
    assert [r.id for r in records] == good
    listed = [json.loads(line) for line in skipped.read_text(encoding="utf-8").splitlines()]
    assert [row["line"] for row in listed] == list(range(2, 2 * len(BAD) + 1, 2))
    assert [row["field"] for row in listed] == [field for _, field, _ in BAD.values()]
    assert main(["data", "validate", str(path), "--skip-invalid-to", str(skipped)]) == 2
    assert capsys.readouterr().out.strip().endswith(f"{len(good)} valid record(s), 1-1 rejected each; "
                                                    f"{len(BAD)} invalid")


def test_training_data_with_every_bad_kind_keeps_every_good_record(corpus, root, tiny_vlm):
    path, good = corpus
    _, processor = tiny_vlm("llava")
    cfg = DataConfig(train=str(path), max_length=512, skip_invalid_to=str(root / "train_skipped.jsonl"))
    records, n_skipped = load_pairs(cfg, processor, collate_preference, margin_key=None, is_main=True)
    assert [r.id for r in records] == good and n_skipped == len(BAD)
    assert len((root / "train_skipped.jsonl").read_text().splitlines()) == len(BAD)


def test_a_listing_that_is_the_input_is_refused_before_anything_is_written(corpus, root, capsys):
    path, _ = corpus
    before = path.read_bytes()
    link = root / "same_inode.jsonl"
    link.unlink(missing_ok=True)
    os.link(path, link)
    for target in (path, link, root / "." / "corpus.jsonl"):
        assert main(["data", "validate", str(path), "--skip-invalid-to", str(target)]) == 2
        assert "is the input file itself" in capsys.readouterr().err
        with pytest.raises(RecordError, match="is the input file itself"):
            read_records(path, skip_invalid_to=target)
    cfg = DataConfig(train=str(path), skip_invalid_to=str(link))
    with pytest.raises(ValueError, match="is the training file itself"):
        load_pairs(cfg, None, collate_preference, margin_key=None, is_main=True)
    assert main(["data", "convert", "--format", "trl", str(path), str(link)]) == 2
    assert "the output" in capsys.readouterr().err
    assert path.read_bytes() == before


@pytest.mark.parametrize("name, content, reason", [
    ("missing.jsonl", None, "no such file"),
    ("folder.jsonl", "dir", "not a file"),
    ("records.csv", "id,chosen\n", "unknown record file type '.csv'"),
    ("broken.parquet", "not parquet at all", "not a readable Parquet file"),
])
def test_file_level_problems_exit_2_naming_the_file(root, name, content, reason, capsys):
    path = root / "files" / name
    path.parent.mkdir(exist_ok=True)
    if content == "dir":
        path.mkdir(exist_ok=True)
    elif content is not None:
        path.write_text(content)
    assert main(["data", "validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and reason in err and "Traceback" not in err
