"""Published source files read row by row, converted and validated as a stream (``mmalign data convert``).

Inputs: ``.jsonl``, ``.json`` (one array, parsed incrementally), ``.parquet`` (by row groups), or a folder written
by ``datasets.Dataset.save_to_disk`` (its Arrow files, by batches). Nothing holds a whole file: rows are read,
converted (``mmalign.data.sources``), checked (fields, duplicate ids, each image decoded under the data root) and
handed on one at a time, so a 14-shard, 14 GB set converts in bounded memory.

Rows without an id column get ``<layout>-<input name>-<row number>`` (input name: the file name without its
suffix, or the folder name), so ids stay the same whichever shards are converted together and differ between
shards; two inputs with the same name are refused, since their fallback ids would collide.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from mmalign.data import io
from mmalign.data.schema import FieldError, PreferenceRecord, RecordError, check_fields, check_images, record_dict
from mmalign.data.sources import CONVERTERS

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20


def iter_json_array(path: str | Path, chunk: int = _CHUNK) -> Iterator[tuple[int, Any]]:
    """``(row number, row)`` of a file holding one JSON array, decoded element by element (1-based).

    Reads ``chunk`` characters at a time; memory holds the current element and one chunk, never the file.
    """
    decoder = json.JSONDecoder()
    path = Path(path)
    with open(path, encoding="utf-8") as handle:
        buf, pos, eof, number = "", 0, False, 0
        expect_open = True

        def fill() -> bool:
            nonlocal buf, pos, eof
            more = handle.read(chunk)
            buf, pos, eof = buf[pos:] + more, 0, not more
            return bool(more)

        while True:
            while pos < len(buf) and buf[pos].isspace():
                pos += 1
            if pos == len(buf):
                if eof or not fill():
                    raise RecordError("the JSON array is not closed (file ends early)", file=str(path), line=number)
                continue
            char = buf[pos]
            if expect_open:
                if char != "[":
                    raise RecordError(f"expected a JSON array of rows, found {char!r} first", file=str(path))
                pos, expect_open = pos + 1, False
                continue
            if char == "]":
                return
            if char == "," and number > 0:
                pos += 1
                continue
            try:
                row, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError as err:
                if not eof and fill():  # the element may continue in the next chunk
                    continue
                raise RecordError(f"not valid JSON: {err.msg}", file=str(path), line=number + 1) from err
            number += 1
            pos = end
            yield number, row


def _iter_dataset_folder(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Rows of a ``save_to_disk`` folder from the Arrow storage (images stay encoded ``{bytes, path}``)."""
    from datasets import Dataset, load_from_disk

    ds = load_from_disk(str(path))
    if not isinstance(ds, Dataset):
        raise ValueError(f"{path}: a DatasetDict; give one split's folder (e.g. {path / 'train'})")
    number = 0
    for table in ds.with_format("arrow").iter(batch_size=256):
        for row in table.to_pylist():
            number += 1
            yield number, row


def iter_rows(path: str | Path) -> Iterator[tuple[int, Any]]:
    """``(row number, row)`` of one source input (file or ``datasets`` folder), streamed, 1-based."""
    path = io.local_path(path, "source file")
    if path.is_dir():
        yield from _iter_dataset_folder(path)
    elif path.suffix == ".parquet":
        yield from io.read_parquet_rows(path)
    elif path.suffix == ".jsonl":
        for line, text in io.read_jsonl_lines(path):
            try:
                yield line, json.loads(text)
            except json.JSONDecodeError as err:
                raise RecordError(f"not valid JSON: {err}", file=str(path), line=line) from err
    elif path.suffix == ".json":
        yield from iter_json_array(path)
    else:
        raise ValueError(f"{path}: unknown source type {path.suffix!r}; expected .json, .jsonl, .parquet or a "
                         f"datasets folder")


def input_name(path: str | Path) -> str:
    """What fallback ids are built from: the file name without its suffix, or the folder name."""
    path = Path(path)
    return path.name if path.is_dir() else path.stem


def _unique_names(inputs: Sequence[str | Path]) -> list[str]:
    names = [input_name(p) for p in inputs]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise ValueError(f"inputs share the name(s) {clash}: rows without an id would get the same fallback id; "
                         f"rename or convert them separately")
    return names


def convert_rows(rows: Iterable[tuple[int, Any]], fmt: str, *, name: str, file: str | None = None,
                 on_invalid: Callable[[RecordError], None] | None = None) -> Iterator[tuple[int, PreferenceRecord]]:
    """``(row number, record)`` of rows in layout ``fmt``; rows may be ``datasets`` rows with decoded PIL images.

    ``name``: the input's name (fallback ids ``<layout>-<name>-<row>``); ``file``: how errors name the input
    (default ``name``). A row the converter refuses raises RecordError naming file, row number, the row's id
    and the field, or with ``on_invalid`` is passed to it and skipped.
    """
    if fmt not in CONVERTERS:
        raise ValueError(f"unknown source format {fmt!r}; known: {sorted(CONVERTERS)}")
    for number, row in rows:
        try:
            if not isinstance(row, dict):
                raise FieldError(None, f"expected an object, got {type(row).__name__}")
            records = CONVERTERS[fmt](row, f"{name}-{number}")
        except FieldError as err:
            rid = str(row.get("id")) if isinstance(row, dict) and row.get("id") is not None else None
            error = RecordError(err.reason, file=file or name, line=number, record_id=rid, field=err.field)
            if on_invalid is None:
                raise error from err
            on_invalid(error)
            continue
        for record in records:
            yield number, record


def convert_inputs(inputs: Sequence[str | Path], fmt: str, *, data_root: str | Path, min_rejected: int = 0,
                   on_invalid: Callable[[RecordError], None] | None = None) -> Iterator[PreferenceRecord]:
    """Every valid record of ``inputs`` (files / ``datasets`` folders, in order), streamed.

    Each record is checked as ``read_records`` checks one (fields, ids unique across all inputs, images
    decodable under ``data_root``). Without ``on_invalid`` the first bad row or record raises RecordError;
    with it, each error is passed to it and the row or record is skipped.
    """
    seen: dict[str, str] = {}
    verified: set[str] = set()
    for path, name in zip(inputs, _unique_names(inputs)):
        for number, record in convert_rows(iter_rows(path), fmt, name=name, file=str(path), on_invalid=on_invalid):
            try:
                check_fields(record_dict(record), min_rejected=min_rejected)
                if record.id in seen:
                    raise FieldError("id", f"duplicate id (first in {seen[record.id]})")
                check_images(record, data_root, verified)
            except FieldError as err:
                error = RecordError(err.reason, file=str(path), line=number, record_id=record.id, field=err.field)
                if on_invalid is None:
                    raise error from err
                on_invalid(error)
                continue
            seen[record.id] = f"{path}, line {number}"
            yield record
    logger.info("%d %s input(s) -> %d valid record(s)", len(inputs), fmt, len(seen))


def convert_file(path: str | Path, fmt: str) -> list[PreferenceRecord]:
    """All records of one source file in layout ``fmt``, unvalidated beyond the converter (tests, notebooks)."""
    path = Path(path)
    return [record for _, record in convert_rows(iter_rows(path), fmt, name=input_name(path), file=str(path))]
