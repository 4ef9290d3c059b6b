"""Resumable, sharded per-record results: append-only JSONL shards that survive SIGKILL at any point.

A run owns a work folder beside its output. Each process appends one JSON line per finished record to its
own ``shard-<process index>.jsonl`` (one ``write`` + ``fsync`` per batch), so a kill leaves at most a torn
last line, which is ignored by readers and cut off by its owner on restart. Records are split between
processes by a hash of their id (``owner``), which depends on neither order nor batching; on restart every
shard (of any earlier process count) is read and finished ids are skipped, so each record ends up exactly
once. ``run.json`` pins the settings that determine results: resuming with different ones is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

RUN_FILE = "run.json"


class ResumeError(ValueError):
    """A work folder that belongs to a run with other settings, or holds a corrupt shard."""


def owner(record_id: str, n_processes: int) -> int:
    """Process (0..n-1) that handles a record: a hash of its id, independent of order and batching."""
    digest = hashlib.sha256(record_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") % n_processes


def work_dir_for(output: str | Path) -> Path:
    """``<dir>/.<output name>.parts``: where the shards of a run writing ``output`` live."""
    output = Path(output)
    return output.with_name(f".{output.name}.parts")


def init_work_dir(work_dir: Path, fingerprint: dict[str, Any]) -> None:
    """Create the work folder with its ``run.json``, or check that an existing one has the same fingerprint."""
    work_dir.mkdir(parents=True, exist_ok=True)
    run_file = work_dir / RUN_FILE
    if run_file.exists():
        found = json.loads(run_file.read_text())
        if found != fingerprint:
            changed = sorted(k for k in set(found) | set(fingerprint) if found.get(k) != fingerprint.get(k))
            raise ResumeError(
                f"{work_dir}: holds a run with other settings ({', '.join(changed)} differ); "
                "delete the folder to start over or restore the settings to resume"
            )
        return
    tmp = run_file.with_name(f".{RUN_FILE}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(fingerprint, indent=2, sort_keys=True) + "\n")
    tmp.replace(run_file)


def _complete_lines(path: Path) -> tuple[list[str], int]:
    """Lines of a shard that end with a newline, and the byte length they cover (a torn tail is excluded)."""
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    return data[:end].decode("utf-8").splitlines(), end


def read_entries(work_dir: Path) -> dict[str, dict[str, Any]]:
    """Every finished entry of every shard, by record id; a torn last line is ignored."""
    entries: dict[str, dict[str, Any]] = {}
    for path in sorted(work_dir.glob("shard-*.jsonl")):
        lines, _ = _complete_lines(path)
        for number, line in enumerate(lines, start=1):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as err:
                raise ResumeError(f"{path}, line {number}: corrupt shard entry ({err})") from err
            if entry["id"] in entries:
                raise ResumeError(f"{path}, line {number}: record {entry['id']!r} is already in another shard entry")
            entries[entry["id"]] = entry
    return entries


class ShardWriter:
    """Appends entries to ``shard-<index>.jsonl``, first cutting a torn tail left by a killed run."""

    def __init__(self, work_dir: Path, process_index: int):
        self.path = work_dir / f"shard-{process_index:05d}.jsonl"
        if self.path.exists():
            _, end = _complete_lines(self.path)
            with open(self.path, "r+b") as handle:
                handle.truncate(end)

    def append(self, entries: Iterable[dict[str, Any]]) -> None:
        """Write the entries as one block and fsync, so a batch is either fully on disk or cut on restart."""
        block = "".join(json.dumps(e, ensure_ascii=False, allow_nan=False) + "\n" for e in entries)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(block)
            handle.flush()
            os.fsync(handle.fileno())


def open_work_dir(accelerator: Any, work_dir: Path, fingerprint: dict[str, Any]) -> None:
    """The main process creates (or checks) the work folder; the others then only check its fingerprint."""
    if accelerator.is_main_process:
        init_work_dir(work_dir, fingerprint)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        init_work_dir(work_dir, fingerprint)
