"""Images of records: open, verify, hash; file paths confined to the data root.

A record image is either a path relative to a data root (``"images/0001.png"``) or the encoded image
bytes themselves (PNG/JPEG/...). Paths are resolved against the root and must stay inside it after
resolving ``..`` and symlinks, so a dataset cannot make training read arbitrary files.

Size limit: an image of more than ``MAX_IMAGE_PIXELS`` pixels is refused from its header, before any pixel is
decoded. A PNG of a few hundred kilobytes can declare 12000 x 12000 pixels (432 MB as RGB, gigabytes once a
processor converts it to floats), and PIL's own decompression-bomb guard only warns below twice its limit.
Every stage opens images through ``decode_image`` (validation, training, sampling, evaluation, ``serve``), so
the limit holds everywhere.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

from PIL import Image

# 50 megapixels: above a 48 MP camera photo, far above what any VLM processor feeds its vision tower (they
# resize to at most ~13 MP); 150 MB as RGB.
MAX_IMAGE_PIXELS = 50_000_000

# What PIL raises on a file it cannot identify or decode (UnidentifiedImageError is an OSError; broken PNG
# chunks raise SyntaxError; some decoders raise ValueError).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError)


class ImageError(ValueError):
    """An image reference that cannot be used: escapes the root, is missing, or does not decode."""


def resolve_image_path(ref: str, data_root: str | Path) -> Path:
    """Absolute path of a relative image reference, confined to ``data_root``.

    Rejects absolute paths, and relative ones whose resolved target (``..`` and symlinks followed)
    lies outside the resolved root. Existence is not checked here.
    """
    if not ref:
        raise ImageError("empty image path")
    if "\x00" in ref:
        raise ImageError(f"image path {ref!r} contains a NUL character")
    if Path(ref).is_absolute():
        raise ImageError(f"image path {ref!r} is absolute; paths must be relative to the data root")
    root = Path(data_root).resolve()
    try:
        target = (root / ref).resolve()
    except (OSError, RuntimeError) as err:  # a symlink loop, a name too long for the file system
        raise ImageError(f"image path {ref!r} cannot be resolved: {err}") from err
    if not target.is_relative_to(root):
        raise ImageError(f"image path {ref!r} escapes the data root {str(root)!r} (resolves to {str(target)!r})")
    return target


def read_image_bytes(ref: str | bytes, data_root: str | Path) -> bytes:
    """The encoded bytes of an image reference (embedded bytes are returned as they are)."""
    if isinstance(ref, bytes):
        return ref
    path = resolve_image_path(ref, data_root)
    try:
        if not path.is_file():
            raise ImageError(f"image file {ref!r} not found under the data root {str(Path(data_root))!r}")
        return path.read_bytes()
    except OSError as err:  # unreadable: permissions, a name too long, an I/O error
        raise ImageError(f"image file {ref!r} cannot be read: {err}") from err


def decode_image(data: bytes, name: str = "embedded image", max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Fully decode encoded image bytes into an RGB image; truncated or corrupt data, or more than
    ``max_pixels`` pixels (checked from the header, before decoding), raises ImageError."""
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:  # PIL refuses at open() beyond twice its own limit
        raise ImageError(f"{name} declares more pixels than the limit of {max_pixels:,}: {err}") from err
    except _DECODE_ERRORS as err:
        raise ImageError(f"{name} is unreadable or corrupt: {err}") from err
    with img:
        width, height = img.size
        if width * height > max_pixels:
            raise ImageError(f"{name} is {width} x {height} = {width * height:,} pixels, more than the limit of "
                             f"{max_pixels:,}; resize it first")
        try:
            # convert() forces a full decode, so truncation is caught here and not later in a collator.
            return img.convert("RGB")
        except _DECODE_ERRORS as err:
            raise ImageError(f"{name} is unreadable or corrupt: {err}") from err


def open_image(ref: str | bytes, data_root: str | Path) -> Image.Image:
    """Open a record image as an RGB ``PIL.Image``; raises ImageError naming the reference on failure."""
    name = f"image file {ref!r}" if isinstance(ref, str) else f"embedded image ({len(ref)} bytes)"
    return decode_image(read_image_bytes(ref, data_root), name)


def image_sha256(ref: str | bytes, data_root: str | Path) -> str:
    """Hex SHA-256 of the image's encoded bytes: the same content gives the same hash wherever it lives."""
    return hashlib.sha256(read_image_bytes(ref, data_root)).hexdigest()
