"""A record file together with the folder its image paths resolve against: how every stage opens its data.

``RecordSet.at(file, data_root)`` is the one place the rule "images live under ``data_root``, else beside the
file" is applied; the handle then reads the records, opens and hashes their images, and describes the file for
provenance sidecars and fingerprints.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from mmalign.data.images import image_sha256, open_image
from mmalign.data.record_files import image_root, read_records
from mmalign.data.schema import PreferenceRecord


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks (record files can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class RecordSet:
    """``path``: a record file (.jsonl / .parquet); ``root``: the folder its relative image paths resolve in."""

    path: Path
    root: Path

    @classmethod
    def at(cls, path: str | Path, data_root: str | Path | None = None) -> RecordSet:
        """The set of ``path`` with images under ``data_root`` (None or "": the file's folder)."""
        return cls(Path(path), image_root(path, data_root))

    def read(self, *, min_rejected: int = 0, skip_invalid_to: str | Path | None = None) -> list[PreferenceRecord]:
        """Every record, validated (``record_files.read_records``), images checked under ``root``."""
        return read_records(self.path, data_root=self.root, min_rejected=min_rejected,
                            skip_invalid_to=skip_invalid_to)

    def open(self, ref: str | bytes) -> Image.Image:
        """One image reference as an RGB image (confined to ``root``)."""
        return open_image(ref, self.root)

    def images(self, record: PreferenceRecord) -> list[Image.Image]:
        """The images of ``record``, in order."""
        return [self.open(ref) for ref in record.images]

    def image_hashes(self, record: PreferenceRecord) -> list[str]:
        """SHA-256 of each image's encoded bytes (same content, same hash, wherever the file lives)."""
        return [image_sha256(ref, self.root) for ref in record.images]

    def sha256(self) -> str:
        """SHA-256 of the record file itself."""
        return file_sha256(self.path)

    def provenance(self) -> dict[str, Any]:
        """What a derived file records about its input: resolved file and image root, and the file's hash."""
        return {"file": str(self.path.resolve()), "data_root": str(self.root.resolve()), "file_sha256": self.sha256()}
