"""Record files: reading, writing and decoding the on-disk layouts of ``mmalign.data.schema.PreferenceRecord``.

- JSONL: one JSON object per line with exactly the keys ``id, images, prompt, chosen, rejected, source,
  meta`` (``source`` and ``meta`` may be left out); an embedded image is ``{"bytes": "<base64>"}``.
- Parquet: the same columns; images as ``list<struct<path: string, bytes: binary>>`` (the layout of a
  ``datasets.Image`` column), ``prompt`` and ``meta`` as JSON text (see ``mmalign.data.io``).

Reading validates every record (``schema.validate_records``). ``write_records`` checks the same fields (not
the image files, which live under a root the writer does not know) and writes a provenance sidecar when
given one.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from mmalign.data import io
from mmalign.data.schema import FieldError, PreferenceRecord, RecordError, check_fields, record_dict, validate_records

__all__ = ["read_records", "write_records", "records_from_dataset", "record_to_json", "provenance_path", "image_root",
           "record_line"]

_PROVENANCE_RESERVED = ("count", "created")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """JSON objects with a key given twice are refused (``json`` would silently keep the last value)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise FieldError(key, "key given twice in one JSON object")
        out[key] = value
    return out


def _decode_json_line(data: bytes) -> Any:
    """One JSONL line (raw bytes) -> record dict with ``{"bytes": base64}`` images decoded to bytes."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise FieldError(None, f"not valid UTF-8 ({err.reason} at byte {err.start}: {data[err.start:err.end]!r})"
                         ) from err
    try:
        raw = json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as err:
        raise FieldError(None, f"not valid JSON: {err}") from err
    except RecursionError:
        raise FieldError(None, "JSON nested too deeply to decode") from None
    except FieldError:  # a key given twice (``_unique_keys``)
        raise
    except ValueError as err:  # e.g. an integer of more digits than Python converts
        raise FieldError(None, f"not valid JSON: {err}") from err
    if isinstance(raw, dict) and isinstance(raw.get("images"), list):
        raw["images"] = [_decode_json_image(ref, i) for i, ref in enumerate(raw["images"])]
    return raw


def _decode_json_image(ref: Any, index: int) -> Any:
    if not isinstance(ref, dict):
        return ref
    if set(ref) != {"bytes"} or not isinstance(ref["bytes"], str):
        raise FieldError(f"images[{index}]",
                         f"an embedded image is {{'bytes': <base64 string>}}, got keys {sorted(ref)}")
    try:
        return base64.b64decode(ref["bytes"], validate=True)
    except binascii.Error as err:
        raise FieldError(f"images[{index}]", f"invalid base64: {err}") from err


def _decode_image_struct(ref: Any, index: int) -> Any:
    """``{"path", "bytes"}`` (Parquet / ``datasets.Image`` storage) -> bytes when present, else the path."""
    if not isinstance(ref, dict):
        return ref
    if set(ref) != {"path", "bytes"} or (ref["bytes"] is None and ref["path"] is None):
        raise FieldError(f"images[{index}]", f"an image struct has 'path' or 'bytes' set, got {ref!r:.80}")
    return ref["bytes"] if ref["bytes"] is not None else ref["path"]


def _decode_parquet_row(row: dict[str, Any]) -> dict[str, Any]:
    """A row of a record Parquet file (JSON ``prompt``/``meta``, image structs) -> record dict."""
    row = dict(row)
    for key in ("prompt", "meta"):
        if isinstance(row.get(key), str):
            try:
                row[key] = json.loads(row[key])
            except json.JSONDecodeError as err:
                raise FieldError(key, f"not valid JSON text: {err}") from err
    if isinstance(row.get("images"), list):
        row["images"] = [_decode_image_struct(ref, i) for i, ref in enumerate(row["images"])]
    return row


def _decode_dataset_row(row: dict[str, Any]) -> dict[str, Any]:
    """A ``datasets`` row in record layout -> record dict.

    Arrow gives every struct the union of keys across rows, so message parts come back as
    ``{"type": "image", "text": None}``; the None-valued keys are dropped.
    """
    row = dict(row)
    if isinstance(row.get("images"), list):
        row["images"] = [_decode_image_struct(ref, i) for i, ref in enumerate(row["images"])]
    if isinstance(row.get("prompt"), list):
        row["prompt"] = [
            m | {"content": [{k: v for k, v in p.items() if v is not None} for p in m["content"]]}
            if isinstance(m, dict) and isinstance(m.get("content"), list) else m
            for m in row["prompt"]
        ]
    return row


def records_from_dataset(ds: Any, *, data_root: str | Path, min_rejected: int = 0,
                         skip_invalid_to: str | Path | None = None, name: str = "<dataset>") -> list[PreferenceRecord]:
    """Validate a ``datasets.Dataset`` whose columns are the record keys into records.

    Rows are read from the Arrow storage, so ``datasets.Image`` columns arrive as encoded bytes (never
    decoded and re-encoded). A dataset loaded from an mmalign Parquet file (``load_dataset("parquet", ...)``)
    has ``meta`` as a string column: its ``prompt`` and ``meta`` are then JSON text, decoded as the Parquet
    reader decodes them. ``name`` stands in for the file name in errors; "line" is the row number.
    """
    from datasets import Value

    meta = ds.features.get("meta")
    json_text = isinstance(meta, Value) and meta.dtype in ("string", "large_string")
    decode = _decode_parquet_row if json_text else _decode_dataset_row
    def rows() -> Iterable[tuple[int, dict[str, Any]]]:
        number = 0
        for table in ds.with_format("arrow").iter(batch_size=256):
            for row in table.to_pylist():
                number += 1
                yield number, row

    return validate_records(rows(), decode, file=name, data_root=data_root,
                            min_rejected=min_rejected, skip_invalid_to=skip_invalid_to)


def record_to_json(record: PreferenceRecord) -> dict[str, Any]:
    """The JSONL object of a record (bytes images as base64)."""
    images = [{"bytes": base64.b64encode(r).decode("ascii")} if isinstance(r, bytes) else r for r in record.images]
    return record_dict(record) | {"images": images}


def image_root(path: str | Path, data_root: str | Path | None) -> Path:
    """The folder the image paths of record file ``path`` resolve against: ``data_root`` when given (None or
    "" = not given), else the file's own folder."""
    return Path(data_root) if data_root not in (None, "") else Path(path).parent


def read_records(path: str | Path, *, data_root: str | Path | None = None, min_rejected: int = 0,
                 skip_invalid_to: str | Path | None = None) -> list[PreferenceRecord]:
    """Read and validate a ``.jsonl`` or ``.parquet`` record file.

    Image paths are relative to ``data_root`` (default: the file's folder). Raises RecordError on the first
    bad record, or with ``skip_invalid_to`` writes the bad ones there (file, line, id, field, reason).
    """
    path = io.local_path(path, "record file")
    root = image_root(path, data_root)
    if path.suffix not in (".jsonl", ".parquet"):
        raise RecordError(f"unknown record file type {path.suffix!r}; expected .jsonl or .parquet", file=str(path))
    if not path.is_file():
        raise RecordError("no such file" if not path.exists() else "not a file", file=str(path))
    if skip_invalid_to is not None and io.same_file(skip_invalid_to, path):
        raise RecordError(f"skip_invalid_to {str(skip_invalid_to)!r} is the input file itself; the list of bad "
                          "records would overwrite the data", file=str(path))
    if path.suffix == ".jsonl":
        rows, decode = io.read_jsonl_bytes(path), _decode_json_line
    else:
        rows, decode = _parquet_rows(path), _decode_parquet_row
    return validate_records(rows, decode, file=str(path), data_root=root, min_rejected=min_rejected,
                            skip_invalid_to=skip_invalid_to)


def _parquet_rows(path: Path) -> Iterable[tuple[int, dict[str, Any]]]:
    """Rows of a record Parquet file; a file Arrow cannot read is a RecordError naming it."""
    import pyarrow as pa

    try:
        yield from io.read_parquet_rows(path)
    except (pa.ArrowException, OSError) as err:
        raise RecordError(f"not a readable Parquet file: {err}", file=str(path)) from err


def record_line(path: str | Path, record_id: str) -> int | None:
    """The line (JSONL) or row (Parquet) number of the record ``record_id`` in a record file, for error messages
    about a record that has been read already; None if no row carries that id."""
    path = Path(path)
    if path.suffix == ".parquet":
        ids = pq.read_table(path, columns=["id"]).column("id").to_pylist()
        return next((n for n, rid in enumerate(ids, start=1) if rid == record_id), None)
    for number, text in io.read_jsonl_lines(path):
        try:
            if json.loads(text).get("id") == record_id:
                return number
        except (json.JSONDecodeError, AttributeError):
            continue
    return None


def write_records(path: str | Path, records: Iterable[PreferenceRecord], provenance: dict | None = None) -> int:
    """Write records as ``.jsonl`` or ``.parquet``, checking their fields, as they come (streamed); returns the
    number written.

    With ``provenance`` (e.g. ``{"sampler": "bdhs", "seed": 0, "model": ..., "config_hash": ...}``) a
    sidecar ``<file>.provenance.json`` is written with ``count`` and ``created`` (UTC) added. A bad record
    raises RecordError and leaves no file behind.
    """
    path = Path(path)
    if path.suffix not in (".jsonl", ".parquet"):
        raise ValueError(f"{path}: unknown record file type {path.suffix!r}; expected .jsonl or .parquet")
    if provenance is not None and any(k in provenance for k in _PROVENANCE_RESERVED):
        raise ValueError(f"provenance keys {list(_PROVENANCE_RESERVED)} are filled in by write_records")
    if provenance is not None:
        json.dumps(provenance, allow_nan=False)  # a provenance that is not JSON fails before any file is written
    seen: set[str] = set()

    def checked() -> Iterable[PreferenceRecord]:
        for line, record in enumerate(records, start=1):
            try:
                check_fields(record_dict(record))
                if record.id in seen:
                    raise FieldError("id", "duplicate id")
            except FieldError as err:
                raise RecordError(err.reason, file=str(path), line=line, record_id=str(record.id),
                                  field=err.field) from err
            seen.add(record.id)
            yield record

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        io.write_jsonl(path, (record_to_json(r) for r in checked()))
    else:
        io.write_parquet(path, (record_dict(r) for r in checked()))
    if provenance is not None:
        created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        sidecar = json.dumps(dict(provenance) | {"count": len(seen), "created": created}, indent=2, allow_nan=False)
        provenance_path(path).write_text(sidecar + "\n")
    return len(seen)


def provenance_path(path: str | Path) -> Path:
    """``<file>.provenance.json`` beside a record file."""
    path = Path(path)
    return path.with_name(path.name + ".provenance.json")
