"""Image references: confinement to the data root, decoding to RGB, content hashes."""

import hashlib
import io

import pytest
from PIL import Image

from mmalign.data.images import ImageError, image_sha256, open_image, resolve_image_path


def _encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def test_open_image_converts_to_rgb_from_path_and_bytes(tmp_path):
    Image.new("L", (3, 2), 200).save(tmp_path / "gray.png")
    img = open_image("gray.png", tmp_path)
    assert (img.mode, img.size, img.getpixel((0, 0))) == ("RGB", (3, 2), (200, 200, 200))
    rgba = Image.new("RGBA", (2, 2), (10, 20, 30, 255))
    img = open_image(_encode(rgba), tmp_path)
    assert (img.mode, img.getpixel((1, 1))) == ("RGB", (10, 20, 30))


def test_image_sha256_is_the_hash_of_the_encoded_bytes(tmp_path):
    data = _encode(Image.new("RGB", (4, 4), (1, 2, 3)))
    (tmp_path / "a.png").write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    assert image_sha256("a.png", tmp_path) == expected == image_sha256(data, tmp_path)
    assert image_sha256(_encode(Image.new("RGB", (4, 4), (1, 2, 4))), tmp_path) != expected


def test_resolve_confines_to_root(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    assert resolve_image_path("sub/../x.png", root) == (root / "x.png").resolve()
    with pytest.raises(ImageError, match="escapes the data root"):
        resolve_image_path("sub/../../x.png", root)
    with pytest.raises(ImageError, match="is absolute"):
        resolve_image_path(str(root / "x.png"), root)
    (root / "out.png").symlink_to(tmp_path / "elsewhere.png")
    with pytest.raises(ImageError, match="escapes the data root"):
        resolve_image_path("out.png", root)


def test_truncated_jpeg_is_reported_corrupt(tmp_path):
    data = _encode(Image.effect_noise((64, 64), 50).convert("RGB"), "JPEG")
    (tmp_path / "t.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"image file 't.jpg' is unreadable or corrupt: image file is truncated"):
        open_image("t.jpg", tmp_path)


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match="image file 'none.png' not found under the data root"):
        open_image("none.png", tmp_path)
