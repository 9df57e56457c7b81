"""imaging: decode/encode round trips per format and mode, metadata, and refusals of bad input."""

from __future__ import annotations

import io
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image, ImageCms, ImageOps

from clipsr import imaging
from clipsr.imaging import ImageDecodeError, decode, encode

RNG = np.random.default_rng(1234)


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _u8(h=6, w=9, c=3) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, c), dtype=np.uint8)


def _u16(h=6, w=9, c=3) -> np.ndarray:
    return RNG.integers(0, 65536, (h, w, c), dtype=np.uint16)


def _smooth16(h=40, w=50, c=3) -> np.ndarray:
    """Smooth 16-bit content, so that the PNG filters actually predict something."""
    y, x = np.mgrid[0:h, 0:w]
    planes = [(x * 1000 + y * 300 + k * 7000 + (x * y) % 97) % 65536 for k in range(c)]
    return np.stack(planes, axis=2).astype(np.uint16)


def _srgb_icc() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def _exif(orientation: int | None = None) -> bytes:
    exif = Image.Exif()
    exif[0x010F] = "clipsr-test-camera"  # Make
    if orientation is not None:
        exif[0x0112] = orientation
    return exif.tobytes()


def _exif_tags(raw: bytes) -> dict:
    exif = Image.Exif()
    exif.load(raw)
    return dict(exif)


# --- 8-bit round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "BMP"])
@pytest.mark.parametrize("channels", [1, 3])
def test_lossless_8bit_round_trip_is_exact(fmt, channels):
    values = _u8(c=channels)
    d = decode(encode(values / 255.0, None, fmt))
    assert d.format == fmt and d.bit_depth == 8 and d.alpha is None
    assert d.pixels.dtype == np.float32 and d.pixels.shape == values.shape
    np.testing.assert_array_equal(imaging.to_uint8(d.pixels), values)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
@pytest.mark.parametrize("channels", [1, 3])
def test_alpha_round_trip_is_exact(fmt, channels):
    values, alpha = _u8(c=channels), _u8(c=1)[..., 0]
    d = decode(encode(values / 255.0, alpha / 255.0, fmt))
    assert d.pixels.shape[2] == channels
    np.testing.assert_array_equal(imaging.to_uint8(d.pixels), values)
    np.testing.assert_array_equal(imaging.to_uint8(d.alpha), alpha)


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_lossy_round_trip_is_close(fmt):
    y, x = np.mgrid[0:32, 0:48]
    pixels = np.stack([x / 47, y / 31, (x + y) / 78], axis=2).astype(np.float32)
    d = decode(encode(pixels, None, fmt, quality=95))
    assert d.format == fmt and d.pixels.shape == pixels.shape
    assert np.abs(d.pixels - pixels).mean() < 0.02


def test_webp_keeps_alpha_and_grey_comes_back_as_colour():
    grey = np.full((8, 8, 1), 0.5, np.float32)
    alpha = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    d = decode(encode(grey, alpha, "webp"))
    assert d.pixels.shape == (8, 8, 3)  # WEBP stores no grey mode
    assert np.abs(d.alpha - alpha).max() < 0.05


@pytest.mark.parametrize("fmt", ["JPEG", "BMP"])
def test_formats_without_alpha_composite_onto_white(fmt):
    pixels = np.zeros((8, 8, 3), np.float32)
    alpha = np.zeros((8, 8), np.float32)
    alpha[:, :4] = 1.0
    d = decode(encode(pixels, alpha, fmt))
    assert d.alpha is None
    assert d.pixels[:, 6:].min() > 0.95 and d.pixels[:, :2].max() < 0.05


def test_palette_with_transparency_becomes_rgba():
    im = Image.new("P", (4, 3))
    im.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (3 * 253))
    im.putpixel((1, 1), 1)
    im.putpixel((2, 1), 2)
    d = decode(_save(im, "PNG", transparency=0))
    assert d.mode == "P" and d.pixels.shape == (3, 4, 3) and d.alpha is not None
    assert d.alpha[0, 0] == 0.0 and d.alpha[1, 1] == 1.0
    np.testing.assert_array_equal(imaging.to_uint8(d.pixels[1, 1]), [255, 0, 0])


def test_palette_without_transparency_is_rgb_without_alpha():
    im = Image.fromarray(_u8(c=3)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    d = decode(_save(im, "PNG"))
    assert d.alpha is None and d.pixels.shape[2] == 3
    np.testing.assert_array_equal(imaging.to_uint8(d.pixels), np.asarray(im.convert("RGB")))


def test_rgb_png_with_single_transparent_colour_gets_alpha():
    values = np.zeros((2, 3, 3), np.uint8)
    values[0, 0] = (10, 20, 30)
    d = decode(_save(Image.fromarray(values), "PNG", transparency=(10, 20, 30)))
    assert d.alpha[0, 0] == 0.0 and d.alpha[1, 2] == 1.0


def test_bilevel_is_grey():
    values = (_u8(c=1)[..., 0] > 127)
    d = decode(_save(Image.fromarray(values), "PNG"))
    assert d.mode == "1" and d.pixels.shape[2] == 1
    np.testing.assert_array_equal(d.pixels[..., 0], values.astype(np.float32))


def test_cmyk_jpeg_is_converted_to_rgb_with_a_note():
    cmyk = Image.new("CMYK", (8, 6), (0, 255, 255, 0))  # pure red in CMYK
    d = decode(_save(cmyk, "JPEG", quality=95))
    assert d.mode == "CMYK" and d.pixels.shape == (6, 8, 3)
    assert any("CMYK" in n for n in d.notes)
    red = d.pixels.reshape(-1, 3).mean(axis=0)
    assert red[0] > 0.9 and red[1] < 0.1 and red[2] < 0.1


# --- 16-bit ----------------------------------------------------------------------------------------


def test_16bit_grey_png_from_pillow_keeps_16bit_precision():
    values = _u16(c=1)[..., 0]
    d = decode(_save(Image.fromarray(values), "PNG"))
    assert d.bit_depth == 16 and d.mode.startswith("I;16") and d.pixels.shape[2] == 1
    np.testing.assert_array_equal(imaging.to_uint16(d.pixels[..., 0]), values)


def test_16bit_grey_png_we_write_is_read_exactly_by_pillow():
    values = _smooth16(c=1)
    data = encode(values / 65535.0, None, "PNG", bit_depth=16)
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode == "I;16"
        np.testing.assert_array_equal(np.asarray(im), values[..., 0])


@pytest.mark.parametrize("channels,with_alpha", [(3, False), (3, True), (1, True)])
def test_16bit_png_with_colour_or_alpha_round_trips_exactly(channels, with_alpha):
    values = _smooth16(c=channels + with_alpha)
    alpha = values[..., -1] / 65535.0 if with_alpha else None
    data = encode(values[..., :channels] / 65535.0, alpha, "PNG", bit_depth=16)
    d = decode(data)
    assert d.bit_depth == 16 and not d.notes
    np.testing.assert_array_equal(imaging.to_uint16(d.pixels), values[..., :channels])
    if with_alpha:
        np.testing.assert_array_equal(imaging.to_uint16(d.alpha), values[..., -1])
    # Pillow's own 8-bit reading sees the high bytes: an independent check of the writer's filters.
    if channels == 3:
        with Image.open(io.BytesIO(data)) as im:
            np.testing.assert_array_equal(np.asarray(im)[..., :3], (values[..., :3] >> 8).astype(np.uint8))


@pytest.mark.parametrize("byteorder", ["<", ">"])
@pytest.mark.parametrize("compression", [None, "zlib"])
@pytest.mark.parametrize("channels", [3, 4])
def test_16bit_colour_tiff_keeps_16bit_with_tifffile(byteorder, compression, channels, monkeypatch):
    monkeypatch.setattr(imaging, "_pil_hilo", None)  # tifffile alone must do it
    values = _u16(c=channels)
    buf = io.BytesIO()
    tifffile.imwrite(buf, values, photometric="rgb", byteorder=byteorder, compression=compression,
                     extrasamples=("unassalpha",) if channels == 4 else None)
    d = decode(buf.getvalue())
    assert d.bit_depth == 16 and d.format == "TIFF" and not d.notes
    np.testing.assert_array_equal(imaging.to_uint16(d.pixels), values[..., :3])
    if channels == 4:
        np.testing.assert_array_equal(imaging.to_uint16(d.alpha), values[..., 3])


def test_16bit_tiff_falls_back_to_pillow_when_tifffile_cannot_read(monkeypatch):
    """LZW needs imagecodecs in tifffile; Pillow's decoder run twice must still give 16 bits."""
    values = _u16(c=3)
    buf = io.BytesIO()
    tifffile.imwrite(buf, values, photometric="rgb", compression="zlib")

    def unavailable(*args, **kwargs):
        raise ValueError("<COMPRESSION.LZW: 5> requires the 'imagecodecs' package")

    monkeypatch.setattr(imaging, "_tiff_page_values", unavailable)
    d = decode(buf.getvalue())
    assert d.bit_depth == 16 and not d.notes
    np.testing.assert_array_equal(imaging.to_uint16(d.pixels), values)


def test_16bit_colour_reduced_to_8bit_is_noted_when_no_decoder_can_keep_it(monkeypatch):
    values = _smooth16()
    data = encode(values / 65535.0, None, "PNG", bit_depth=16)
    monkeypatch.setattr(imaging, "_pil_hilo", lambda data: (_ for _ in ()).throw(ValueError("no")))
    d = decode(data)
    assert d.bit_depth == 16 and any("reduced to 8-bit" in n for n in d.notes)
    np.testing.assert_array_equal(imaging.to_uint8(d.pixels), (values >> 8).astype(np.uint8))


@pytest.mark.parametrize("channels,with_alpha", [(1, False), (3, False), (3, True), (1, True)])
def test_16bit_tiff_we_write_round_trips_exactly(channels, with_alpha):
    values = _u16(c=channels + with_alpha)
    alpha = values[..., -1] / 65535.0 if with_alpha else None
    d = decode(encode(values[..., :channels] / 65535.0, alpha, "tif", bit_depth=16))
    assert d.bit_depth == 16 and d.format == "TIFF"
    np.testing.assert_array_equal(imaging.to_uint16(d.pixels), values[..., :channels])
    if with_alpha:
        np.testing.assert_array_equal(imaging.to_uint16(d.alpha), values[..., -1])


def test_16bit_requested_for_8bit_only_format_writes_8bit():
    d = decode(encode(np.full((4, 4, 3), 0.5, np.float32), None, "JPEG", bit_depth=16))
    assert d.bit_depth == 8


# --- orientation, EXIF, ICC ---------------------------------------------------------------------


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pillow_exif_transpose(orientation):
    values = _u8(h=5, w=8)
    data = _save(Image.fromarray(values), "PNG", exif=_exif(orientation))
    with Image.open(io.BytesIO(data)) as im:
        expected = np.asarray(ImageOps.exif_transpose(im))
    d = decode(data)
    assert d.orientation == orientation
    np.testing.assert_array_equal(imaging.to_uint8(d.pixels), expected)


def test_exif_rotated_jpeg_is_upright_and_orientation_tag_removed():
    data = _save(Image.fromarray(_u8(h=16, w=24)), "JPEG", exif=_exif(6))
    d = decode(data)
    assert d.pixels.shape == (24, 16, 3)  # rotated: width and height swapped
    tags = _exif_tags(d.exif)
    assert 0x0112 not in tags and tags[0x010F] == "clipsr-test-camera"
    # and it survives being written out again
    again = decode(encode(d.pixels, None, "JPEG", exif=d.exif))
    assert again.pixels.shape == (24, 16, 3) and again.orientation == 1
    assert _exif_tags(again.exif)[0x010F] == "clipsr-test-camera"


@pytest.mark.parametrize("fmt,bit_depth", [("PNG", 8), ("PNG", 16), ("JPEG", 8), ("WEBP", 8),
                                           ("TIFF", 8), ("TIFF", 16)])
def test_icc_profile_is_kept(fmt, bit_depth):
    icc = _srgb_icc()
    d = decode(_save(Image.fromarray(_u8()), "PNG", icc_profile=icc))
    assert d.icc_profile == icc
    out = decode(encode(d.pixels, None, fmt, bit_depth=bit_depth, icc_profile=d.icc_profile))
    assert out.icc_profile == icc


@pytest.mark.parametrize("fmt,bit_depth", [("PNG", 8), ("PNG", 16), ("JPEG", 8), ("WEBP", 8), ("TIFF", 8),
                                           ("TIFF", 16)])
def test_exif_is_kept(fmt, bit_depth):
    out = decode(encode(np.full((4, 5, 3), 0.25, np.float32), None, fmt, bit_depth=bit_depth, exif=_exif()))
    assert _exif_tags(out.exif)[0x010F] == "clipsr-test-camera"
    assert fmt in imaging.EXIF_FORMATS


def test_bmp_has_no_room_for_exif():
    assert "BMP" not in imaging.EXIF_FORMATS
    out = decode(encode(np.full((4, 5, 3), 0.25, np.float32), None, "BMP", exif=_exif()))
    assert out.exif is None


def _archive_exif() -> Image.Exif:
    exif = Image.Exif()
    exif[0x013B] = "An Archivist"  # Artist
    exif[0x0131] = "Scanner 2.1"  # Software
    exif.get_ifd(0x8769)[0x9003] = "1999:12:31 23:59:59"  # DateTimeOriginal
    exif.get_ifd(0x8825)[0x0002] = (51.0, 30.0, 12.5)  # GPSLatitude
    return exif


def _assert_archive_exif(raw: bytes) -> None:
    kept = Image.Exif()
    kept.load(raw)
    assert kept[0x013B] == "An Archivist" and kept[0x0131] == "Scanner 2.1"
    assert kept.get_ifd(0x8769)[0x9003] == "1999:12:31 23:59:59"
    assert kept.get_ifd(0x8825)[0x0002] == (51.0, 30.0, 12.5)


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_16bit_tiff_keeps_exif_sub_directories(channels):
    """tifffile writes 16-bit TIFFs; the Exif and GPS directories are linked in after it."""
    pixels = RNG.random((5, 6, 1 if channels < 3 else 3)).astype(np.float32)
    alpha = RNG.random((5, 6)).astype(np.float32) if channels in (2, 4) else None
    data = encode(pixels, alpha, "TIFF", bit_depth=16, exif=_archive_exif().tobytes())
    d = decode(data)  # 16-bit grey+alpha takes the tifffile-only path
    assert d.bit_depth == 16 and not d.notes
    np.testing.assert_array_equal(imaging.to_uint16(d.pixels), imaging.to_uint16(pixels))
    _assert_archive_exif(d.exif)
    with tifffile.TiffFile(io.BytesIO(data)) as tf:  # and other readers find it too
        tags = tf.pages[0].tags
        assert tags["Artist"].value == "An Archivist"
        assert tags["ExifTag"].value["DateTimeOriginal"] == "1999:12:31 23:59:59"


def test_multi_page_tiff_gives_its_first_page_and_says_what_became_of_the_others():
    frames = [Image.fromarray(np.full((4, 4), v, np.uint8)) for v in (10, 200, 90)]
    buf = io.BytesIO()
    frames[0].save(buf, format="TIFF", save_all=True, append_images=frames[1:])
    d = decode(buf.getvalue())
    assert d.notes == ["multi-page TIFF: page 1 of 3 enhanced, the other pages are not in the output"]
    assert imaging.to_uint8(d.pixels).max() == 10
    webp = _save(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    assert decode(webp).notes == ["animated (3 frames): first frame only"]


def test_gif_still_is_decoded_with_its_transparency_and_animated_gif_is_refused():
    palette = Image.fromarray(RNG.integers(0, 4, (6, 9), dtype=np.uint8), mode="P")
    palette.putpalette([0, 0, 0, 250, 10, 10, 10, 250, 10, 10, 10, 250])
    still = decode(_save(palette, "GIF", transparency=0, optimize=False))
    assert (still.format, still.mode, still.pixels.shape) == ("GIF", "P", (6, 9, 3))
    np.testing.assert_array_equal(imaging.to_uint8(still.pixels), np.asarray(palette.convert("RGB")))
    assert still.alpha is not None and (still.alpha == 0).sum() == (np.asarray(palette) == 0).sum()
    frames = [Image.fromarray(np.full((4, 4, 3), v, np.uint8)) for v in (10, 200)]
    with pytest.raises(ImageDecodeError, match=r"^animated GIF \(2 frames\): not enhanced"):
        decode(_save(frames[0], "GIF", save_all=True, append_images=frames[1:]))


def test_jpeg_2000_keeps_8_bits_exactly_and_more_than_8_bits_at_16():
    rgb = _u8()
    d = decode(_save(Image.fromarray(rgb), "JPEG2000"))  # Pillow writes it losslessly by default
    assert (d.format, d.bit_depth) == ("JPEG2000", 8)
    np.testing.assert_array_equal(imaging.to_uint8(d.pixels), rgb)
    grey = _u16(c=1)[..., 0]
    d = decode(_save(Image.fromarray(grey), "JPEG2000"))
    assert d.bit_depth == 16 and d.pixels.shape == (6, 9, 1)
    np.testing.assert_array_equal(imaging.to_uint16(d.pixels)[..., 0], grey)
    imagecodecs = pytest.importorskip("imagecodecs")
    twelve = RNG.integers(0, 4096, (6, 9, 3), dtype=np.uint16)  # 12-bit colour: Pillow alone gets it wrong
    d = decode(imagecodecs.jpeg2k_encode(twelve, level=0, bitspersample=12))
    assert (d.bit_depth, d.pixels.shape) == (16, (6, 9, 3))
    np.testing.assert_array_equal(imaging.to_uint16(d.pixels), np.round(twelve * (65535 / 4095)).astype(np.uint16))


def test_jpeg_xl_keeps_its_bit_depth_and_is_refused_from_its_header():
    imagecodecs = pytest.importorskip("imagecodecs")
    for values in (_u8(), _u16(), _u8(c=4)):
        for container in (False, True):
            data = imagecodecs.jpegxl_encode(values, lossless=True, usecontainer=container)
            d = decode(data)
            assert (d.format, d.bit_depth) == ("JXL", 16 if values.dtype == np.uint16 else 8)
            quantise = imaging.to_uint16 if d.bit_depth == 16 else imaging.to_uint8
            np.testing.assert_array_equal(quantise(d.pixels), values[..., :3])
            assert (d.alpha is not None) == (values.shape[2] == 4)
    big = imagecodecs.jpegxl_encode(np.zeros((3000, 2000, 3), np.uint8), lossless=True)
    assert len(big) < 4096 and imaging.header_size(big[:64]) == ("JXL", 2000, 3000)
    with pytest.raises(ImageDecodeError, match="header says 2000x3000 = 6,000,000 pixels"):
        decode(big, max_pixels=1_000_000)


def test_avif_and_heic_are_decoded_at_8_bits():
    rgb = np.zeros((16, 24, 3), np.uint8)
    rgb[:, :12], rgb[:, 12:] = (200, 30, 30), (30, 30, 200)
    avif = decode(_save(Image.fromarray(rgb), "AVIF", quality=95))
    heic = decode((Path(__file__).parent / "data" / "two-halves-24x16.heic").read_bytes())
    for d, fmt in ((avif, "AVIF"), (heic, "HEIF")):
        assert (d.format, d.bit_depth, d.pixels.shape) == (fmt, 8, (16, 24, 3))
        assert np.abs(imaging.to_uint8(d.pixels).astype(int) - rgb).mean() < 4  # lossy, close


def test_a_header_in_the_first_bytes_gives_format_and_size_without_the_rest():
    png = _save(Image.fromarray(_u8(300, 400)), "PNG")
    jpeg = _save(Image.fromarray(_u8(300, 400)), "JPEG", exif=_exif(6))
    assert imaging.header_size(png[:1024]) == ("PNG", 400, 300)
    assert imaging.header_size(jpeg[:1024]) == ("JPEG", 400, 300)  # as stored: the pixel count is the same
    metadata_first = _save(Image.fromarray(_u8(300, 400)), "JPEG", icc_profile=bytes(100_000))
    assert imaging.header_size(metadata_first[:65536]) is None  # cannot tell: the caller reads it all
    assert imaging.header_size(metadata_first) == ("JPEG", 400, 300)
    assert imaging.header_size(b"not an image at all") is None
    # Pillow reads these only whole: their sizes are parsed from the first bytes here.
    image = Image.fromarray(_u8(300, 400))
    for webp in (_save(image, "WEBP", quality=90), _save(image, "WEBP", lossless=True),
                 _save(image, "WEBP", quality=90, exif=_exif())):  # VP8, VP8L, VP8X
        assert imaging.header_size(webp[:64]) == ("WEBP", 400, 300)
    assert imaging.header_size(_save(image, "AVIF", quality=90)[:4096]) == ("AVIF", 400, 300)
    fmt, width, height = imaging.header_size((Path(__file__).parent / "data" / "two-halves-24x16.heic").read_bytes())
    assert fmt == "HEIF" and width >= 24 and height >= 16  # as coded: padded to the codec's blocks


def test_unsupported_image_files_are_named_and_other_formats_are_written_as_png():
    assert imaging.unsupported_reason("raw/IMG_0001.CR2") == "unsupported format: camera raw (.cr2) is not decoded"
    assert imaging.unsupported_reason("x/layers.psd").startswith("unsupported format: Photoshop")
    assert imaging.unsupported_reason("a.jp2") is None and imaging.unsupported_reason("notes.txt") is None
    assert {imaging.output_format_for(imaging.format_for_path(f"a{e}")) for e in (".gif", ".jp2", ".heic", ".avif",
                                                                                   ".jxl")} == {"PNG"}
    assert imaging.output_format_for("WEBP") == "WEBP"


# --- refusals ------------------------------------------------------------------------------------


def _bomb_png(width: int, height: int) -> bytes:
    """A tiny real PNG whose IHDR is patched to announce width x height (CRC fixed up)."""
    data = bytearray(_save(Image.new("L", (8, 8)), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def test_decompression_bomb_is_refused_from_the_header():
    data = _bomb_png(100_000, 100_000)
    assert len(data) < 200
    start = time.perf_counter()
    with pytest.raises(ImageDecodeError, match="max_pixels"):
        decode(data)
    assert time.perf_counter() - start < 0.5


def test_max_pixels_is_a_per_call_limit():
    data = _save(Image.fromarray(_u8(h=20, w=20)), "PNG")
    with pytest.raises(ImageDecodeError, match="400 pixels, more than max_pixels=399"):
        decode(data, max_pixels=399)
    assert decode(data, max_pixels=400).pixels.shape == (20, 20, 3)


def test_huge_image_within_a_raised_limit_is_not_refused_by_pillows_global_limit():
    # Pillow's own MAX_IMAGE_PIXELS would raise here; our limit is the only one that counts.
    data = _bomb_png(20_000, 10_000)
    with pytest.raises(ImageDecodeError, match="corrupt"):  # fails at decoding, not at the header
        decode(data, max_pixels=300_000_000)


@pytest.mark.parametrize("data,reason", [
    (b"", "empty"),
    (bytes(RNG.integers(0, 256, 4096, dtype=np.uint8)), "not a supported image"),
    (b"%!PS-Adobe-3.0 EPSF-3.0\n", "not a supported image"),
])
def test_non_images_are_refused(data, reason):
    with pytest.raises(ImageDecodeError, match=reason):
        decode(data)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "TIFF"])
def test_truncated_images_are_refused(fmt):
    data = _save(Image.fromarray(_u8(h=64, w=64)), fmt)
    with pytest.raises(ImageDecodeError):
        decode(data[: len(data) // 2])


def test_unsupported_mode_is_refused():
    data = _save(Image.fromarray(np.zeros((4, 4), np.float32)), "TIFF")
    with pytest.raises(ImageDecodeError, match="unsupported image mode F"):
        decode(data)


def test_image_decode_error_is_a_value_error():
    assert issubclass(ImageDecodeError, ValueError)


# --- encode arguments ---------------------------------------------------------------------------


@pytest.mark.parametrize("pixels,alpha,match", [
    (np.zeros((4, 4), np.float32), None, "HxWxC"),
    (np.zeros((4, 4, 2), np.float32), None, "HxWxC"),
    (np.zeros((4, 4, 3), np.uint8), None, "floats"),
    (np.full((4, 4, 3), np.nan, np.float32), None, "NaN"),
    (np.zeros((4, 4, 3), np.float32), np.zeros((4, 5), np.float32), "alpha"),
])
def test_encode_refuses_bad_arrays(pixels, alpha, match):
    with pytest.raises(ValueError, match=match):
        encode(pixels, alpha, "PNG")


def test_encode_refuses_unknown_format_and_depth():
    pixels = np.zeros((2, 2, 3), np.float32)
    with pytest.raises(ValueError, match="unsupported image format"):
        encode(pixels, None, "gif")
    with pytest.raises(ValueError, match="bit_depth"):
        encode(pixels, None, "PNG", bit_depth=12)


def test_encode_saturates_out_of_range_values():
    pixels = np.array([[[-0.5, 0.5, 1.5]]], np.float32)
    d = decode(encode(pixels, None, "PNG"))
    np.testing.assert_array_equal(imaging.to_uint8(d.pixels[0, 0]), [0, 128, 255])


# --- helpers ------------------------------------------------------------------------------------


def test_load_rgb_or_grey_uint8_channels_and_16bit_rounding():
    assert imaging.load_rgb_or_grey_uint8(_save(Image.fromarray(_u8(c=1)[..., 0]), "PNG")).shape[2] == 1
    la = _save(Image.fromarray(_u8(c=2)), "PNG")
    assert imaging.load_rgb_or_grey_uint8(la).shape[2] == 1
    rgba = _u8(c=4)
    out = imaging.load_rgb_or_grey_uint8(_save(Image.fromarray(rgba), "PNG"))
    assert out.dtype == np.uint8 and out.shape == (6, 9, 3)
    np.testing.assert_array_equal(out, rgba[..., :3])
    values = np.array([[0, 128, 129, 385, 65535]], np.uint16)
    out16 = imaging.load_rgb_or_grey_uint8(_save(Image.fromarray(values), "PNG"))
    np.testing.assert_array_equal(out16[..., 0], [[0, 0, 1, 1, 255]])


def test_format_for_path_and_extensions():
    assert imaging.format_for_path("s3://b/x/Photo.JPEG") == "JPEG"
    assert imaging.format_for_path("a/b.tif") == "TIFF"
    assert imaging.is_image_path("x.WebP") and not imaging.is_image_path("notes.txt")
    assert imaging.IMAGE_EXTENSIONS == {".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif", ".jp2",
                                        ".j2k", ".j2c", ".jpc", ".jpf", ".jpx", ".avif", ".heic", ".heif", ".hif",
                                        ".jxl"}
    assert imaging.format_for_path("scan.JP2") == "JPEG2000" and imaging.format_for_path("p.heic") == "HEIF"
    with pytest.raises(ValueError, match="not an image file name"):
        imaging.format_for_path("layers.psd")


def test_to_uint8_and_uint16_round_then_clip():
    x = np.array([-1.0, 0.5 / 255, 1.5 / 255, 2.0])
    np.testing.assert_array_equal(imaging.to_uint8(x), [0, 0, 2, 255])
    np.testing.assert_array_equal(imaging.to_uint16(np.array([-1.0, 1.0, 7.0])), [0, 65535, 65535])


def test_benchmark_images_load_like_pillow(bench_data):
    for path in sorted(bench_data("val", "set14").glob("*.png")):
        data = path.read_bytes()
        out = imaging.load_rgb_or_grey_uint8(data)
        with Image.open(path) as im:
            expected = np.asarray(im.convert("L" if im.mode == "L" else "RGB"))
        np.testing.assert_array_equal(out, expected.reshape(out.shape))
        assert out.shape[2] == (1 if path.name == "bridge.png" else 3)


def test_tiff_descriptive_tags_become_exif_and_layout_tags_do_not():
    exif = Image.Exif()
    exif[0x013B] = "An Archivist"  # Artist
    exif.get_ifd(0x8769)[0x9003] = "1999:12:31 23:59:59"  # DateTimeOriginal
    data = _save(Image.fromarray(_u8()), "TIFF", exif=exif.tobytes())
    d = decode(data)
    kept = Image.Exif()
    kept.load(d.exif)
    assert kept[0x013B] == "An Archivist" and 0x0100 not in kept  # no ImageWidth
    assert kept.get_ifd(0x8769)[0x9003] == "1999:12:31 23:59:59"
    again = decode(encode(d.pixels, None, "JPEG", exif=d.exif))
    assert _exif_tags(again.exif)[0x013B] == "An Archivist"


def test_tiff_only_path_applies_orientation_and_keeps_icc():
    values = _u16(h=4, w=7, c=2)  # 16-bit grey+alpha: Pillow cannot open it, tifffile can
    buf = io.BytesIO()
    tifffile.imwrite(buf, values, photometric="minisblack", planarconfig="contig",
                     extrasamples=("unassalpha",), iccprofile=_srgb_icc(), extratags=[(274, "H", 1, 6, True)])
    d = decode(buf.getvalue())
    assert d.orientation == 6 and d.pixels.shape == (7, 4, 1) and d.icc_profile == _srgb_icc()
    np.testing.assert_array_equal(imaging.to_uint16(d.alpha), np.rot90(values[..., 1], -1))


def test_tiff_only_path_keeps_exif():
    """A third-party 16-bit grey+alpha TIFF (Pillow cannot open it): its descriptive tags are its EXIF."""
    buf = io.BytesIO()
    tifffile.imwrite(buf, _u16(h=4, w=7, c=2), photometric="minisblack", planarconfig="contig",
                     extrasamples=("unassalpha",), extratags=[(315, "s", 0, "An Archivist", True)],
                     software="Scanner 2.1")
    d = decode(buf.getvalue())
    kept = Image.Exif()
    kept.load(d.exif)
    assert kept[0x013B] == "An Archivist" and kept[0x0131] == "Scanner 2.1" and 0x0100 not in kept


def test_tiff_only_path_checks_max_pixels_first():
    buf = io.BytesIO()
    tifffile.imwrite(buf, _u16(h=30, w=30, c=2), photometric="minisblack", planarconfig="contig",
                     extrasamples=("unassalpha",))
    with pytest.raises(ImageDecodeError, match="max_pixels"):
        decode(buf.getvalue(), max_pixels=100)


def test_16bit_planar_separate_tiff_keeps_16bit():
    values = _u16(c=3)
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.moveaxis(values, -1, 0), photometric="rgb", planarconfig="separate")
    d = decode(buf.getvalue())
    assert d.bit_depth == 16 and not d.notes
    np.testing.assert_array_equal(imaging.to_uint16(d.pixels), values)


@pytest.mark.parametrize("orientation", [2, 6, 8])
@pytest.mark.parametrize("path", ["pillow-8bit", "tifffile-16bit", "pillow-16bit"])
def test_tiff_orientation_is_applied_exactly_once(orientation, path, monkeypatch):
    """Pillow's TIFF plugin rotates on load by itself; the other decoders do not."""
    if path == "pillow-8bit":
        values = _u8(h=4, w=7)
        exif = Image.Exif()
        exif[0x0112] = orientation
        data = _save(Image.fromarray(values), "TIFF", exif=exif.tobytes())
    else:
        values = _u16(h=4, w=7)
        buf = io.BytesIO()
        tifffile.imwrite(buf, values, photometric="rgb", extratags=[(274, "H", 1, orientation, True)])
        data = buf.getvalue()
        if path == "pillow-16bit":
            monkeypatch.setattr(imaging, "_tiff_page_values", None)
    d = decode(data)
    expected = imaging._orient(values, orientation)  # checked against ImageOps above
    assert d.orientation == orientation and not d.notes
    convert = imaging.to_uint8 if values.dtype == np.uint8 else imaging.to_uint16
    np.testing.assert_array_equal(convert(d.pixels), expected)


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about the broken TIFF tags
def test_mutated_files_either_decode_or_raise_image_decode_error():
    """Bad input must be a recorded error, never another exception type that crashes a job."""
    rng = np.random.default_rng(7)
    values = _u8(h=24, w=32)
    palette = Image.fromarray(values).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    seeds = [_save(Image.fromarray(values), fmt) for fmt in ("PNG", "JPEG", "WEBP", "TIFF", "BMP")]
    seeds += [
        _save(palette, "PNG", transparency=0),
        _save(Image.fromarray(np.dstack([values, values[..., :1]])), "WEBP"),
        encode(values / 255.0, values[..., 0] / 255.0, "PNG", bit_depth=16),
        encode(values[..., :1] / 255.0, values[..., 0] / 255.0, "TIFF", bit_depth=16),
    ]
    outcomes = {"decoded": 0, "refused": 0}
    for i in range(600):
        data = bytearray(seeds[i % len(seeds)])
        for _ in range(int(rng.integers(1, 6))):
            pos = int(rng.integers(0, len(data)))
            op = rng.integers(0, 3)
            if op == 0:
                data[pos] = int(rng.integers(0, 256))
            elif op == 1:
                del data[pos:pos + int(rng.integers(1, 50))]
            else:
                data[pos:pos] = rng.integers(0, 256, int(rng.integers(1, 20)), dtype=np.uint8).tobytes()
        try:
            d = decode(bytes(data), max_pixels=10_000_000)
        except ImageDecodeError:
            outcomes["refused"] += 1
        else:
            outcomes["decoded"] += 1
            assert d.pixels.ndim == 3 and d.pixels.shape[2] in (1, 3)
    assert outcomes["refused"] > 100 and outcomes["decoded"] > 10
