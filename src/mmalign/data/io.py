"""File-level reading and writing of record rows: JSONL lines and Parquet tables (no record logic).

Parquet layout of a record file: ``id: string``, ``images: list<struct<path: string, bytes: binary>>``
(one of path/bytes set per image, the storage layout of ``datasets.Image``), ``prompt: string`` (JSON:
a string or a list of chat messages), ``chosen: string``, ``rejected: list<string>``, ``source: string``,
``meta: string`` (JSON object). Files are written to a temporary name and renamed, so a crashed writer
never leaves a half file under the final name.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

PARQUET_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("images", pa.list_(pa.struct([("path", pa.string()), ("bytes", pa.binary())]))),
    ("prompt", pa.string()),
    ("chosen", pa.string()),
    ("rejected", pa.list_(pa.string())),
    ("source", pa.string()),
    ("meta", pa.string()),
])


# "owner/name": how a Hugging Face Hub repository is named (no leading "/", ".", "~"; exactly one "/").
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


class NoHubAccess(Exception):
    """A hub repository id given where mmalign needs a local path (models and data are never downloaded)."""


def local_path(path: str | Path, what: str) -> Path:
    """``path`` as a Path; a missing path spelt like a hub id (``llava-hf/llava-1.5-7b-hf``) raises NoHubAccess
    naming ``what`` (e.g. "model"), so the user learns to download it rather than meeting "file not found"."""
    if not Path(path).exists() and _HUB_ID.match(str(path)):
        raise NoHubAccess(f"{what} {str(path)!r} is not a local path; it looks like a Hugging Face Hub id, and "
                          f"mmalign has no hub access: download it first (e.g. `huggingface-cli download {path} "
                          f"--local-dir DIR`) and give the local path")
    return Path(path)


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


_BOM = "\ufeff".encode("utf-8")


def read_jsonl_bytes(path: str | Path) -> Iterator[tuple[int, bytes]]:
    """``(line number, raw bytes)`` of each non-blank line (1-based, as an editor shows them), undecoded, so a
    line that is not UTF-8 fails alone; a byte-order mark opening the file is dropped (editors on Windows
    write one)."""
    with open(path, "rb") as handle:
        for number, data in enumerate(handle, start=1):
            if number == 1 and data.startswith(_BOM):
                data = data[len(_BOM):]
            if data.strip():
                yield number, data


def read_jsonl_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of each non-blank line; a line that is not UTF-8 raises ValueError naming it."""
    for number, data in read_jsonl_bytes(path):
        try:
            yield number, data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}, line {number}: not valid UTF-8 ({err.reason} at byte {err.start})") from err


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name one file: the same inode when both exist (hard links, symlinks, ``./x`` vs
    ``x``), else the same resolved path."""
    a, b = Path(a), Path(b)
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def _replace_when_done(path: Path, write: Any) -> None:
    """Run ``write(tmp)`` and rename ``tmp`` to ``path``; a failure leaves no file behind, not even the tmp one."""
    tmp = _tmp_path(path)
    try:
        write(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)


def write_jsonl(path: str | Path, objects: Iterable[Any]) -> None:
    """One compact JSON object per line, UTF-8, written as ``objects`` are produced; NaN/inf refused."""
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            for obj in objects:
                handle.write(json.dumps(obj, ensure_ascii=False, allow_nan=False) + "\n")

    _replace_when_done(Path(path), write)


def read_parquet_rows(path: str | Path, batch_size: int = 256) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(row number, row dict)`` of a Parquet file (1-based), read in batches to bound memory."""
    number = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size):
        for row in batch.to_pylist():
            number += 1
            yield number, row


def _parquet_columns(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    columns: dict[str, list[Any]] = {name: [] for name in PARQUET_SCHEMA.names}
    for row in rows:
        columns["id"].append(row["id"])
        columns["images"].append([
            {"path": None, "bytes": ref} if isinstance(ref, bytes) else {"path": ref, "bytes": None}
            for ref in row["images"]
        ])
        columns["prompt"].append(json.dumps(row["prompt"], ensure_ascii=False))
        columns["chosen"].append(row["chosen"])
        columns["rejected"].append(row["rejected"])
        columns["source"].append(row["source"])
        columns["meta"].append(json.dumps(row["meta"], ensure_ascii=False, allow_nan=False))
    return columns


def write_parquet(path: str | Path, rows: Iterable[dict[str, Any]], batch_size: int = 256) -> None:
    """Record dicts (images as ``str | bytes``) -> a Parquet file in ``PARQUET_SCHEMA``, written in row groups of
    ``batch_size`` as the rows are produced (a converted set never has to fit in memory)."""
    def write(tmp: Path) -> None:
        with pq.ParquetWriter(tmp, PARQUET_SCHEMA) as writer:
            batch: list[dict[str, Any]] = []
            for row in rows:
                batch.append(row)
                if len(batch) == batch_size:
                    writer.write_table(pa.table(_parquet_columns(batch), schema=PARQUET_SCHEMA))
                    batch = []
            if batch:
                writer.write_table(pa.table(_parquet_columns(batch), schema=PARQUET_SCHEMA))

    _replace_when_done(Path(path), write)
