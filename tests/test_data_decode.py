"""Decoding real-world files: every odd kind is made here and checked by pixel content or by the error reason."""

import io
import pickle
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from cvt.data import UnreadableImageError, load_image


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _noise(size=(40, 30), seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_rgb_jpeg_and_png_roundtrip(tmp_path):
    img = _noise()
    img.save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    assert out.mode == "RGB" and out.size == (40, 30)
    assert np.array_equal(np.asarray(out), np.asarray(img))  # PNG is lossless


def test_greyscale_becomes_three_equal_channels(tmp_path):
    Image.new("L", (5, 4), 77).save(tmp_path / "g.png")
    out = np.asarray(load_image(tmp_path / "g.png"))
    assert out.shape == (4, 5, 3) and (out == 77).all()


def test_one_bit_image(tmp_path):
    img = Image.new("1", (4, 2), 0)
    img.putpixel((1, 0), 1)
    img.save(tmp_path / "b.png")
    out = np.asarray(load_image(tmp_path / "b.png"))
    assert out[0, 1].tolist() == [255, 255, 255] and out[0, 0].tolist() == [0, 0, 0]


def test_palette_with_transparency_is_composited_on_white(tmp_path):
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)  # index 0 black (transparent), index 1 red
    img.putpixel((2, 2), 1)
    img.info["transparency"] = 0
    img.save(tmp_path / "p.png", transparency=0)
    assert Image.open(tmp_path / "p.png").mode == "P"
    out = np.asarray(load_image(tmp_path / "p.png"))
    assert out[2, 2].tolist() == [255, 0, 0]
    assert out[0, 0].tolist() == [255, 255, 255]  # transparent black shows as white, not black


def test_rgba_alpha_blends_onto_white(tmp_path):
    arr = np.zeros((2, 3, 4), np.uint8)  # black everywhere
    arr[0, 0, 3] = 255  # opaque black
    arr[0, 1, 3] = 0  # fully transparent
    arr[0, 2, 3] = 128  # half transparent: 255 * (1 - 128/255) = 127
    Image.fromarray(arr, "RGBA").save(tmp_path / "a.png")
    out = np.asarray(load_image(tmp_path / "a.png")).astype(int)
    assert out[0, 0].tolist() == [0, 0, 0]
    assert out[0, 1].tolist() == [255, 255, 255]
    assert np.abs(out[0, 2] - 127).max() <= 1


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (16, 16), (255, 0, 0, 0)).save(tmp_path / "c.jpg", quality=95)  # pure cyan
    assert Image.open(tmp_path / "c.jpg").mode == "CMYK"
    out = np.asarray(load_image(tmp_path / "c.jpg")).astype(int)
    assert np.abs(out[8, 8] - [0, 255, 255]).max() <= 4


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    arr = np.array([[0, 32768, 65535, 256]], dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "d.png")
    assert Image.open(tmp_path / "d.png").mode.startswith("I")
    out = np.asarray(load_image(tmp_path / "d.png"))[0, :, 0]
    assert out.tolist() == [0, 128, 255, 1]  # 32768 * 255 / 65535 = 127.5 -> 128; 256 -> 0.996 -> 1


@pytest.mark.parametrize(
    ("orientation", "size", "red_at"),
    [
        (1, (40, 20), "top"),
        (3, (40, 20), "bottom"),  # rotated 180 degrees
        (6, (20, 40), "right"),  # shown rotated 90 degrees clockwise: the stored top row becomes the right column
        (8, (20, 40), "left"),  # shown rotated 90 degrees counter-clockwise
    ],
)
def test_exif_orientation_is_applied(tmp_path, orientation, size, red_at):
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:10] = (255, 0, 0)  # stored: top half red
    arr[10:] = (0, 0, 255)  # bottom half blue
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(arr).save(tmp_path / "e.jpg", exif=exif, quality=95)
    img = load_image(tmp_path / "e.jpg")
    assert img.size == size
    out = np.asarray(img).astype(int)
    h, w = out.shape[:2]
    region = {
        "top": out[: h // 2 - 2],
        "bottom": out[h // 2 + 2 :],
        "left": out[:, : w // 2 - 2],
        "right": out[:, w // 2 + 2 :],
    }[red_at]
    assert region[..., 0].min() > 200 and region[..., 2].max() < 60


def test_tiny_image(tmp_path):
    Image.new("RGB", (1, 1), (1, 2, 3)).save(tmp_path / "t.png")
    out = load_image(tmp_path / "t.png")
    assert out.size == (1, 1) and out.getpixel((0, 0)) == (1, 2, 3)


def test_bomb_guard_by_limit(tmp_path):
    Image.new("RGB", (20, 20)).save(tmp_path / "big.png")
    with pytest.raises(UnreadableImageError, match="400 pixels is above the limit of 100"):
        load_image(tmp_path / "big.png", max_pixels=100)
    assert load_image(tmp_path / "big.png", max_pixels=400).size == (20, 20)


def test_bomb_guard_reads_only_the_header(tmp_path):
    # a 100000 x 100000 PNG header (10 billion pixels, ~30 GB decoded) with a tiny payload
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    data = (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")
    )
    (tmp_path / "bomb.png").write_bytes(data)
    with pytest.raises(UnreadableImageError) as err:
        load_image(tmp_path / "bomb.png")
    assert "bomb" in err.value.reason and err.value.path.endswith("bomb.png")


def test_corrupt_png(tmp_path):
    data = _png_bytes(_noise())
    half = len(data) // 2
    (tmp_path / "c.png").write_bytes(data[:half] + bytes(len(data) - half))  # IDAT payload overwritten by zeros
    with pytest.raises(UnreadableImageError, match="corrupt or truncated"):
        load_image(tmp_path / "c.png")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated(tmp_path, fmt):
    buf = io.BytesIO()
    _noise().save(buf, fmt)
    (tmp_path / "t.img").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(UnreadableImageError, match="truncated"):
        load_image(tmp_path / "t.img")


def test_zero_byte_file(tmp_path):
    (tmp_path / "z.jpg").write_bytes(b"")
    with pytest.raises(UnreadableImageError, match=r"empty file \(0 bytes\)"):
        load_image(tmp_path / "z.jpg")


def test_text_file_with_image_name(tmp_path):
    (tmp_path / "notes.jpg").write_text("not an image at all\n")
    with pytest.raises(UnreadableImageError, match="not an image") as err:
        load_image(tmp_path / "notes.jpg")
    assert str(err.value).startswith(str(tmp_path / "notes.jpg"))


def test_missing_file(tmp_path):
    with pytest.raises(UnreadableImageError, match="cannot read the file"):
        load_image(tmp_path / "nope.png")


def test_bytes_source_and_error_pickles():
    assert load_image(_png_bytes(_noise()), name="member.png").size == (40, 30)
    with pytest.raises(UnreadableImageError) as err:
        load_image(b"garbage", name="shard.tar:0001.jpg")
    copy = pickle.loads(pickle.dumps(err.value))  # crosses DataLoader worker processes
    assert (copy.path, copy.reason) == ("shard.tar:0001.jpg", err.value.reason)
