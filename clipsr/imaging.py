"""Image bytes <-> float arrays, with the archive's awkward cases handled explicitly.

Bytes in, bytes out: no filesystems, no Ray. Every way an input can be bad (empty, not an
image, truncated, too many pixels, unsupported mode) raises `ImageDecodeError` with a short
reason, so a job records a failed row instead of crashing.

Decisions worth knowing:
- The pixel limit is checked against the header's width x height before any pixel is decoded
  (Pillow opens lazily). Pillow's process-global MAX_IMAGE_PIXELS check is bypassed at open on
  purpose (the limit is a per-call argument here), but Pillow still applies it inside its WEBP
  and tiled-TIFF readers: a max_pixels above 2 * Image.MAX_IMAGE_PIXELS (179 M) needs that raised.
- Only the formats in `DECODE_FORMATS` are opened, each by a maintained decoder: Pillow for PNG,
  JPEG, WEBP, TIFF, BMP, GIF, JPEG 2000 (OpenJPEG) and AVIF (libavif), pi-heif (libheif) for
  HEIF/HEIC, imagecodecs (libjxl) for JPEG XL. Pillow's exotic plugins (EPS shells out to
  Ghostscript) are never reached from archive bytes. Image files of other formats (camera raw,
  Photoshop...) are named by `unsupported_reason`, so a job can count them instead of passing them by.
- One still image per file. An animated GIF is refused (its frames are the picture); a multi-page
  TIFF gives its first page, with a note; other animations (WEBP, APNG, AVIF) give their first frame,
  with a note.
- Formats that are read but not written here (GIF, JPEG 2000, AVIF, HEIF, JPEG XL) are written as
  PNG unless the caller picks another (`output_format_for`). AVIF and HEIF are decoded at 8 bits;
  JPEG 2000 above 8 bits keeps its precision (scaled to 16 bits); JPEG XL keeps 8 or 16 bits, and
  its metadata boxes (EXIF, XMP) are not read.
- EXIF orientation is applied to the pixels (ImageOps.exif_transpose semantics) and the
  Orientation tag is removed from the EXIF that is kept for the output. A TIFF's own descriptive
  tags and its Exif/GPS sub-directories count as its EXIF, whichever decoder reads its pixels.
- EXIF is written where the format has room (`EXIF_FORMATS`: all but BMP). 16-bit TIFF gets the
  descriptive tags and the Exif/GPS sub-directories, as 8-bit TIFF does; other first-directory tags
  (resolution, XMP) are not carried into it.
- 16-bit colour: Pillow reduces 16-bit colour PNG/TIFF to 8 bits. TIFF is read with tifffile;
  PNG (and TIFF that tifffile cannot decompress without imagecodecs, such as LZW) is read by
  running Pillow's own decoder twice, once unpacking the high bytes and once the low bytes of each
  sample. If neither works, the image is decoded at 8 bits and a note says so.
- JPEG and BMP keep no alpha (Pillow's BMP writer stores a fourth byte that readers, Pillow included,
  ignore): `encode` composites onto white; callers can check `ALPHA_FORMATS` to record that.
  JPEG, WEBP and BMP are 8-bit only: `encode` writes 8 bits there (see `SIXTEEN_BIT_FORMATS`).
- CMYK is converted to RGB by Pillow without colour management; its CMYK ICC profile is dropped
  because it would be wrong for RGB pixels.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import posixpath
import struct
import sys
import zlib
from dataclasses import dataclass, field

import numpy as np
import tifffile
from PIL import (  # noqa: F401  (importing the plugins registers them in Image.OPEN)
    AvifImagePlugin,
    BmpImagePlugin,
    GifImagePlugin,
    Image,
    Jpeg2KImagePlugin,
    JpegImagePlugin,
    PngImagePlugin,
    TiffImagePlugin,
    WebPImagePlugin,
    features,
)

try:  # HEIF/HEIC: libheif with its HEVC decoder only (LGPL), no encoder
    import pi_heif
except ImportError:  # pragma: no cover  (a dependency; without it HEIF inputs are unsupported)
    pi_heif = None
else:
    pi_heif.register_heif_opener()

# 100 megapixels: a float32 RGB copy is 1.2 GB. Larger archive scans need an explicit, larger limit.
DEFAULT_MAX_PIXELS = 100_000_000

DECODE_FORMATS = ("PNG", "JPEG", "WEBP", "TIFF", "BMP", "GIF", "JPEG2000", "AVIF", "HEIF", "JXL")
ENCODE_FORMATS = ("PNG", "JPEG", "WEBP", "TIFF", "BMP")
SIXTEEN_BIT_FORMATS = frozenset({"PNG", "TIFF"})
ALPHA_FORMATS = frozenset({"PNG", "WEBP", "TIFF"})
EXIF_FORMATS = frozenset({"PNG", "JPEG", "WEBP", "TIFF"})

FORMAT_BY_EXTENSION = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".webp": "WEBP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".bmp": "BMP",
    ".gif": "GIF",
    ".jp2": "JPEG2000",
    ".j2k": "JPEG2000",
    ".j2c": "JPEG2000",
    ".jpc": "JPEG2000",
    ".jpf": "JPEG2000",
    ".jpx": "JPEG2000",
    ".avif": "AVIF",
    ".heic": "HEIF",
    ".heif": "HEIF",
    ".hif": "HEIF",
    ".jxl": "JXL",
}
IMAGE_EXTENSIONS = frozenset(FORMAT_BY_EXTENSION)
# Image files this module does not decode, by what they are: a job reports them, it never passes
# them by as if they were sidecars. (DNG is TIFF inside, but its first page is a preview.)
UNSUPPORTED_EXTENSIONS = {
    **dict.fromkeys((".dng", ".cr2", ".cr3", ".crw", ".nef", ".nrw", ".arw", ".srf", ".sr2", ".orf",
                     ".rw2", ".raf", ".pef", ".srw", ".x3f", ".3fr", ".iiq", ".erf", ".mrw", ".kdc"),
                    "camera raw"),
    ".psd": "Photoshop", ".psb": "Photoshop", ".jxr": "JPEG XR", ".wdp": "JPEG XR", ".hdp": "JPEG XR",
    ".exr": "OpenEXR", ".hdr": "Radiance HDR", ".svg": "SVG", ".eps": "EPS", ".ico": "ICO", ".tga": "TGA",
    ".pcx": "PCX", ".ppm": "Netpbm", ".pgm": "Netpbm", ".pbm": "Netpbm", ".pnm": "Netpbm",
    ".djvu": "DjVu", ".djv": "DjVu",
}
_FORMAT_NAMES = {"JPEG2000": "JPEG 2000", "JXL": "JPEG XL"}
# The extension a converted output gets (`--format`), one per format.
EXTENSION_BY_FORMAT = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "TIFF": ".tif", "BMP": ".bmp"}
_FORMAT_ALIASES = {"JPG": "JPEG", "TIF": "TIFF"}

_ORIENTATION = 0x0112
# TIFF tags that are descriptive metadata (kept as EXIF), unlike the layout tags beside them,
# and the pointers to the EXIF and GPS sub-directories.
_TIFF_DESCRIPTIVE_TAGS = (270, 271, 272, 305, 306, 315, 33432)
_EXIF_SUB_IFDS = (0x8769, 0x8825)
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
# What Pillow's readers (and zlib under them) raise on malformed input.
_PIL_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError,
               struct.error, zlib.error)
# Source modes Pillow can give 8-bit data for, and the mode we convert them to.
_MODE_8BIT = {
    "1": "L", "L": "L", "LA": "LA", "La": "LA",
    "P": "RGB", "PA": "RGBA",  # "P" becomes RGBA when it has transparency (see _pil_values)
    "RGB": "RGB", "RGBA": "RGBA", "RGBa": "RGBA", "RGBX": "RGB",
    "CMYK": "RGB", "YCbCr": "RGB", "HSV": "RGB",
}
_MODE_16BIT_GREY = ("I;16", "I;16L", "I;16B", "I;16N")
_NATIVE_16 = "L" if sys.byteorder == "little" else "B"
# Pillow raw modes that unpack the high byte of each 16-bit sample, and their low-byte twins.
_LOW_BYTE_RAWMODE = {
    "RGB;16B": "RGB;16L", "RGB;16L": "RGB;16B",
    "RGBA;16B": "RGBA;16L", "RGBA;16L": "RGBA;16B",
}


class ImageDecodeError(ValueError):
    """The bytes are not an image this module can decode; str(e) is a short reason for a manifest."""


@dataclass
class Decoded:
    """A decoded image, upright, with what is needed to write it back in kind."""

    pixels: np.ndarray  # float32 HxWxC in [0, 1], C = 1 (grey) or 3 (colour)
    alpha: np.ndarray | None  # float32 HxW in [0, 1], or None
    bit_depth: int  # 8 or 16: of the source (see notes when precision was reduced)
    format: str  # one of DECODE_FORMATS
    mode: str  # the source's Pillow mode, e.g. "P", "I;16", "CMYK"
    icc_profile: bytes | None = None
    exif: bytes | None = None  # without the Orientation tag (the pixels are already upright)
    orientation: int = 1  # the EXIF orientation that was applied
    notes: list[str] = field(default_factory=list)

    @property
    def height(self) -> int:
        return self.pixels.shape[0]

    @property
    def width(self) -> int:
        return self.pixels.shape[1]


# ---------------------------------------------------------------------------------------------
# small helpers


def to_rgb(image: np.ndarray) -> np.ndarray:
    """HxWx1 greyscale as three equal channels (colour models and encoders take RGB); RGB as is."""
    return np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Float [0, 1] -> uint8, rounded to nearest then clipped (out-of-range values saturate)."""
    return np.clip(np.round(np.asarray(x) * 255.0), 0, 255).astype(np.uint8)


def to_uint16(x: np.ndarray) -> np.ndarray:
    """Float [0, 1] -> uint16, rounded to nearest then clipped."""
    return np.clip(np.round(np.asarray(x) * 65535.0), 0, 65535).astype(np.uint16)


def _extension(path: str) -> str:
    return posixpath.splitext(path.rsplit("/", 1)[-1])[1].lower()


def is_image_path(path: str) -> bool:
    """True when the file name has one of IMAGE_EXTENSIONS (case-insensitive)."""
    return _extension(path) in IMAGE_EXTENSIONS


def format_for_path(path: str) -> str:
    """The format of a file with this name, from its extension."""
    try:
        return FORMAT_BY_EXTENSION[_extension(path)]
    except KeyError:
        known = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise ValueError(f"not an image file name: {path!r} (extensions: {known})") from None


def format_name(fmt: str) -> str:
    """'JPEG2000' -> 'JPEG 2000', for messages."""
    return _FORMAT_NAMES.get(fmt, fmt)


def output_format_for(fmt: str) -> str:
    """What an input of ``fmt`` is written as when no output format is asked for: the same format
    where `encode` writes it, else PNG (lossless, 16 bits and alpha, so nothing decoded is lost)."""
    return fmt if fmt in ENCODE_FORMATS else "PNG"


_NEEDS = {"JPEG2000": "Pillow built with OpenJPEG", "AVIF": "Pillow 11.3 or later built with libavif",
          "HEIF": "the pi-heif package", "JXL": "the imagecodecs package"}


@functools.lru_cache(maxsize=1)
def decoders() -> frozenset[str]:
    """The formats of DECODE_FORMATS this installation decodes (the others need optional builds)."""
    found = set(DECODE_FORMATS) - set(_NEEDS)
    found |= {fmt for fmt, feature in (("JPEG2000", "jpg_2000"), ("AVIF", "avif")) if features.check(feature)}
    if pi_heif is not None:
        found.add("HEIF")
    if importlib.util.find_spec("imagecodecs") is not None:
        found.add("JXL")
    return frozenset(found)


def unsupported_reason(path: str) -> str | None:
    """Why an image file with this name cannot be decoded here; None when it can or is no image."""
    ext = _extension(path)
    if ext in UNSUPPORTED_EXTENSIONS:
        return f"unsupported format: {UNSUPPORTED_EXTENSIONS[ext]} ({ext}) is not decoded"
    fmt = FORMAT_BY_EXTENSION.get(ext)
    if fmt is not None and fmt not in decoders():
        return f"unsupported format: {format_name(fmt)} ({ext}) needs {_NEEDS[fmt]}, not installed here"
    return None


def normalise_format(fmt: str) -> str:
    """'png', 'jpg', 'TIF' ... -> the canonical name in ENCODE_FORMATS."""
    name = _FORMAT_ALIASES.get(fmt.upper(), fmt.upper())
    if name not in ENCODE_FORMATS:
        raise ValueError(f"unsupported image format {fmt!r} (choose from {', '.join(ENCODE_FORMATS)})")
    return name


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


# ---------------------------------------------------------------------------------------------
# decoding


def decode(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded:
    """Decode image bytes to float pixels (+ alpha), upright, refusing bad input with ImageDecodeError."""
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    if _is_jxl(data):
        return _decode_jxl(data, max_pixels)
    try:
        im = _open_lazy(data)
    except Image.DecompressionBombError as e:
        raise _pillow_limit_error(e) from e
    except _PIL_ERRORS as e:
        if data[:4] in _TIFF_MAGIC:  # e.g. 16-bit grey+alpha TIFF, which Pillow cannot open
            return _decode_tiff_only(data, max_pixels)
        raise ImageDecodeError(f"unreadable image header: {_short(e)}") from e
    if im is None:
        names = ", ".join(format_name(f) for f in DECODE_FORMATS if f in decoders())
        raise ImageDecodeError(f"not a supported image ({names})")
    with im:
        check_pixels(im.size[0], im.size[1], max_pixels)
        return _decode_pil(im, data)


def header_size(prefix: bytes) -> tuple[str, int, int] | None:
    """Format, width and height from the first bytes of a file, without decoding pixels; None
    when those bytes do not tell (the header runs past them, or the file is no image known here).
    Pillow's readers are used where they stop at the header; WEBP, AVIF, HEIF and JPEG XL sizes are
    parsed here, since their readers want the whole file.

    Lets a caller refuse an image over its pixel limit before fetching the rest of it."""
    try:
        if _is_jxl(prefix):
            return ("JXL", *_jxl_size(prefix))
        if prefix[:4] == b"RIFF" and prefix[8:12] == b"WEBP":  # Pillow's reader wants the whole file
            return ("WEBP", *_webp_size(prefix))
        if prefix[4:8] == b"ftyp":  # AVIF and HEIF: so do theirs
            return _isobmff_size(prefix)
    except (ValueError, IndexError, struct.error):
        return None
    try:
        im = _open_lazy(prefix)
    except Exception:  # noqa: BLE001  any reader error on a prefix only means "read it all"
        return None
    if im is None:
        return None
    with im:
        return ("JPEG" if im.format == "MPO" else im.format, *im.size)


def load_rgb_or_grey_uint8(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """uint8 HxWxC for evaluation: C=1 for grey sources, 3 otherwise; alpha dropped; 16-bit /257."""
    d = decode(data, max_pixels=max_pixels)
    if d.bit_depth == 16:
        return np.round(to_uint16(d.pixels) / 257.0).astype(np.uint8)
    return to_uint8(d.pixels)


def _open_lazy(data: bytes) -> Image.Image | None:
    """Image.open restricted to DECODE_FORMATS and without Pillow's global pixel limit."""
    fp = io.BytesIO(data)
    prefix = data[:16]
    for fmt in DECODE_FORMATS:
        if fmt not in Image.OPEN or fmt not in decoders():
            continue
        factory, accept = Image.OPEN[fmt]
        if accept is None or accept(prefix) is True:
            fp.seek(0)
            return factory(fp, "")
    return None


def _pillow_limit_error(e: Exception) -> ImageDecodeError:
    # WEBP headers and TIFF tiles are also checked by Pillow against its process-global limit.
    return ImageDecodeError(f"too many pixels for Pillow (Image.MAX_IMAGE_PIXELS): {_short(e)}")


def check_pixels(width: int, height: int, max_pixels: int) -> None:
    """Refuse, from its header's size, an image with no pixels or more than ``max_pixels``."""
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageDecodeError(
            f"too many pixels: header says {width}x{height} = {width * height:,} pixels, "
            f"more than max_pixels={max_pixels:,}; refused before decoding"
        )


def _webp_size(prefix: bytes) -> tuple[int, int]:
    """Width and height from the first chunk of a WEBP (VP8X, lossless VP8L or lossy VP8)."""
    kind = prefix[12:16]
    if kind == b"VP8X":
        return int.from_bytes(prefix[24:27], "little") + 1, int.from_bytes(prefix[27:30], "little") + 1
    if kind == b"VP8L" and prefix[20] == 0x2F:
        bits = int.from_bytes(prefix[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if kind == b"VP8 " and prefix[23:26] == b"\x9d\x01\x2a":
        return struct.unpack_from("<H", prefix, 26)[0] & 0x3FFF, struct.unpack_from("<H", prefix, 28)[0] & 0x3FFF
    raise ValueError("no WEBP size in the bytes read")


def _isobmff_size(prefix: bytes) -> tuple[str, int, int] | None:
    """Format and size of an AVIF or HEIF from the 'ispe' (image spatial extent) properties in its
    header: the largest is the primary image (the others are thumbnails, tiles or alpha planes),
    as coded, which may exceed the displayed size by the codec's padding. A header cut short may
    miss it: the decoder checks the size again before decoding."""
    brands = prefix[8:12] + prefix[16:int.from_bytes(prefix[:4], "big")]
    fmt = "AVIF" if b"avif" in brands or b"avis" in brands else "HEIF"
    end = prefix.find(b"mdat")
    header = prefix if end < 0 else prefix[:end]
    sizes, at = [], header.find(b"ispe")
    while at >= 0 and at + 16 <= len(header):
        sizes.append(struct.unpack_from(">II", header, at + 8))  # after version and flags
        at = header.find(b"ispe", at + 4)
    if not sizes:
        return None
    return (fmt, *max(sizes, key=lambda wh: wh[0] * wh[1]))


def _decode_pil(im: Image.Image, data: bytes) -> Decoded:
    notes: list[str] = []
    fmt = "JPEG" if im.format == "MPO" else im.format
    _check_frames(fmt, getattr(im, "n_frames", 1), notes)
    if fmt == "HEIF" and im.info.get("bit_depth", 8) > 8:
        notes.append(f"{im.info['bit_depth']}-bit HEIF decoded at 8 bits")
    # Read before decoding: Pillow clears im.tile once loaded, and its TIFF plugin rotates the
    # pixels on load and then deletes the Orientation tag.
    source16 = _source_is_16bit(im)
    orientation, exif = _orientation_and_exif(im, notes)
    try:
        values, upright = _pil_values(im, data, fmt, notes)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as e:
        raise _pillow_limit_error(e) from e
    except _PIL_ERRORS as e:
        raise ImageDecodeError(f"truncated or corrupt image: {_short(e)}") from e
    if fmt == "PNG" and exif is None and im.info.get("exif"):  # an eXIf chunk after the pixel data
        orientation, exif = _orientation_and_exif(im, notes)
    icc = im.info.get("icc_profile") or None
    if im.mode == "CMYK" and icc is not None:
        icc = None
        notes.append("CMYK ICC profile dropped (pixels converted to RGB)")
    bit_depth = 16 if values.dtype == np.uint16 or source16 else 8
    if bit_depth == 16 and values.dtype == np.uint8:
        notes.append("16-bit colour reduced to 8-bit (no 16-bit decoder for this file)")
    if not upright:
        values = _orient(values, orientation)
    return _finish(values, bit_depth, fmt, im.mode, icc, exif, orientation, notes)


def _check_frames(fmt: str, frames: int, notes: list[str]) -> None:
    """One still image per input: say what happens to the other frames or pages, or refuse."""
    if frames <= 1:
        return
    if fmt == "GIF":
        raise ImageDecodeError(f"animated GIF ({frames} frames): not enhanced (only still images are)")
    if fmt == "TIFF":
        notes.append(f"multi-page TIFF: page 1 of {frames} enhanced, the other pages are not in the output")
    else:
        notes.append(f"animated ({frames} frames): first frame only")


def _pil_values(im: Image.Image, data: bytes, fmt: str, notes: list[str]) -> tuple[np.ndarray, bool]:
    """Integer HxWxC samples (C 1..4, alpha last) at the source's precision where possible,
    and whether the decoder already applied the orientation."""
    mode = im.mode
    if mode in ("RGB", "RGBA", "RGBa") and _source_is_16bit(im):
        found = _colour16(im, data, fmt)
        if found is not None:
            return _with_trns_alpha(found[0], im.info.get("transparency")), found[1]
    if mode in _MODE_16BIT_GREY or mode == "I":
        im.load()
        arr = np.asarray(im)
        if mode == "I" and arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise ImageDecodeError("unsupported mode I: 32-bit samples outside the 16-bit range")
        values = _with_trns_alpha(arr.astype(np.uint16)[..., None], im.info.get("transparency"))
        return values, _pillow_rotated(im)
    if mode not in _MODE_8BIT:
        raise ImageDecodeError(f"unsupported image mode {mode}")
    target = _MODE_8BIT[mode]
    if mode == "P" and "transparency" in im.info:
        target = "RGBA"
    if mode == "CMYK":
        notes.append("CMYK converted to RGB without colour management")
    im.load()
    conv = im if im.mode == target else im.convert(target)
    arr = np.asarray(conv)
    arr = arr[..., None] if arr.ndim == 2 else arr
    if mode in ("L", "RGB"):
        arr = _with_trns_alpha(arr, im.info.get("transparency"))
    return arr, _pillow_rotated(im)


def _pillow_rotated(loaded: Image.Image) -> bool:
    """Whether Pillow applied the orientation itself while loading (its TIFF plugin does, then
    deletes the tag; other plugins leave pixels as stored)."""
    return loaded.format == "TIFF" and _ORIENTATION not in loaded.tag_v2


def _with_trns_alpha(values: np.ndarray, trns) -> np.ndarray:
    """Turn a single transparent colour (PNG tRNS for grey/RGB) into an alpha channel."""
    if trns is None or isinstance(trns, bytes) or values.shape[2] not in (1, 3):
        return values
    key = np.asarray(trns if isinstance(trns, tuple) else (trns,), dtype=np.int64)
    if key.size != values.shape[2]:
        return values
    opaque = np.iinfo(values.dtype).max
    alpha = np.where(np.all(values == key, axis=2), 0, opaque).astype(values.dtype)
    return np.concatenate([values, alpha[..., None]], axis=2)


def _rawmodes(im: Image.Image) -> list[str]:
    """The raw mode of each tile ("" where a decoder's arguments name none, as GIF's do)."""
    modes = [t[3] if isinstance(t[3], str) else (t[3][0] if t[3] else "") for t in im.tile]
    return [m if isinstance(m, str) else "" for m in modes]


def _source_is_16bit(im: Image.Image) -> bool:
    if im.mode in _MODE_16BIT_GREY or im.mode == "I":
        return True
    if im.format == "TIFF":  # planar TIFF tiles carry rawmodes such as "R" whatever the depth
        bits = im.tag_v2.get(258, (8,))
        return max(bits if isinstance(bits, tuple) else (bits,)) == 16
    if im.format == "JPEG2000":
        return _jpeg2000_bits(im) > 8
    return any(";16" in r for r in _rawmodes(im))


def _jpeg2000_bits(im: Image.Image) -> int:
    """Bits per sample of a JPEG 2000 file, from its codestream's SIZ marker (Pillow keeps no record)."""
    fp = im.fp
    fp.seek(0)
    head = fp.read(1 << 16)
    at = head.find(b"\xff\x4f\xff\x51")  # start of codestream, then SIZ
    if at < 0 or len(head) < at + 43:
        return 8
    return (head[at + 42] & 0x7F) + 1


def _colour16(im: Image.Image, data: bytes, fmt: str) -> tuple[np.ndarray, bool] | None:
    """16-bit colour samples (uint16 HxWxC) and whether they are already upright, or None when
    no decoder here can keep 16 bits."""
    if fmt == "TIFF":
        try:
            stored_hw = (im.tag_v2[257], im.tag_v2[256])  # as stored: tifffile does not rotate
            return _tiff_page_values(data, stored_hw)[0], False
        except Exception:  # noqa: BLE001  tifffile raises many types; fall through to Pillow
            pass
    if fmt == "JPEG2000":  # Pillow reads more than 8 bits of colour wrongly: OpenJPEG via imagecodecs
        return _jpeg2000_values(data, _jpeg2000_bits(im), (im.size[1], im.size[0])), False
    try:
        return _pil_hilo(data)
    except (*_PIL_ERRORS, LookupError):
        return None


def _pil_hilo(data: bytes) -> tuple[np.ndarray, bool]:
    """Run Pillow's decoder with high-byte and low-byte unpackers and join the two halves."""
    hi_im = _open_lazy(data)
    rawmodes = set(_rawmodes(hi_im))
    if rawmodes == {"LA;16B"}:  # PNG grey+alpha: 4 bytes a pixel, read them verbatim as "RGBA"
        b = np.asarray(_decode_with_rawmode(hi_im, "RGBA")).astype(np.uint16)
        return (b[..., 0::2] << 8) | b[..., 1::2], False
    if len(rawmodes) != 1:
        raise ValueError(f"unexpected tiles {sorted(rawmodes)}")
    rawmode = rawmodes.pop()
    if rawmode.endswith(";16N"):
        rawmode = rawmode[:-1] + _NATIVE_16
    low_rawmode = _LOW_BYTE_RAWMODE[rawmode]
    hi = np.asarray(_decode_with_rawmode(hi_im, rawmode)).astype(np.uint16)
    lo = np.asarray(_decode_with_rawmode(_open_lazy(data), low_rawmode))
    return (hi << 8) | lo, _pillow_rotated(hi_im)


def _decode_with_rawmode(im: Image.Image, rawmode: str) -> Image.Image:
    tiles = []
    for t in im.tile:
        args = rawmode if isinstance(t[3], str) else (rawmode, *t[3][1:])
        tiles.append(t._replace(args=args))
    im.tile = tiles
    im.load()
    return im


def _tiff_page_values(data: bytes, expected_hw: tuple[int, int] | None = None,
                      max_pixels: int | None = None) -> tuple[np.ndarray, dict]:
    """First page of a TIFF via tifffile as uint8/uint16 HxWxC, plus icc/orientation/pages/photometric."""
    with tifffile.TiffFile(io.BytesIO(data)) as tf:
        page = tf.pages[0]
        if max_pixels is not None:
            check_pixels(page.imagewidth, page.imagelength, max_pixels)
        arr = page.asarray()
        axes = page.axes
        if axes == "YX":
            arr = arr[..., None]
        elif axes == "SYX":
            arr = np.moveaxis(arr, 0, -1)
        elif axes != "YXS":
            raise ValueError(f"unsupported TIFF layout {axes}")
        if arr.dtype not in (np.uint8, np.uint16) or not 1 <= arr.shape[2] <= 4:
            raise ValueError(f"unsupported TIFF samples {arr.dtype} x {arr.shape[2]}")
        if expected_hw is not None and arr.shape[:2] != expected_hw:
            raise ValueError("tifffile and Pillow disagree on the image size")
        if arr.shape[2] in (2, 4) and tuple(page.extrasamples)[:1] == (1,):  # premultiplied alpha
            arr = _unpremultiply(arr)
        icc = page.tags.get(34675)
        orientation = page.tags.get(_ORIENTATION)
        meta = {
            "icc_profile": bytes(icc.value) if icc is not None else None,
            "orientation": int(orientation.value) if orientation is not None else 1,
            "pages": len(tf.pages),
            "photometric": int(page.photometric),
        }
        return np.ascontiguousarray(arr), meta


def _jpeg2000_values(data: bytes, bits: int, expected_hw: tuple[int, int]) -> np.ndarray:
    """A JPEG 2000 of more than 8 bits as uint16 HxWxC, scaled to the full 16-bit range."""
    try:
        import imagecodecs
    except ImportError:
        raise ImageDecodeError("JPEG 2000 above 8 bits needs the imagecodecs package, not installed here") from None
    try:
        arr = imagecodecs.jpeg2k_decode(data)
    except Exception as e:  # noqa: BLE001  imagecodecs raises its own error types
        raise ImageDecodeError(f"truncated or corrupt image: {_short(e)}") from e
    arr = arr[..., None] if arr.ndim == 2 else arr
    if arr.dtype != np.uint16 or arr.shape[:2] != expected_hw or not 1 <= arr.shape[2] <= 4:
        raise ImageDecodeError(f"unsupported JPEG 2000 samples: {arr.dtype} {arr.shape}")
    if bits < 16:
        arr = np.round(np.minimum(arr, (1 << bits) - 1) * (65535 / ((1 << bits) - 1))).astype(np.uint16)
    return np.ascontiguousarray(arr)


def _unpremultiply(arr: np.ndarray) -> np.ndarray:
    top = np.iinfo(arr.dtype).max
    a = arr[..., -1:].astype(np.float64)
    colour = np.where(a > 0, arr[..., :-1] * (top / np.maximum(a, 1)), 0)
    out = arr.copy()
    out[..., :-1] = np.clip(np.round(colour), 0, top)
    return out


def _decode_tiff_only(data: bytes, max_pixels: int) -> Decoded:
    """TIFFs Pillow cannot open (e.g. 16-bit grey+alpha), read with tifffile."""
    try:
        values, meta = _tiff_page_values(data, max_pixels=max_pixels)
    except ImageDecodeError:
        raise
    except Exception as e:  # noqa: BLE001  tifffile raises many types on malformed input
        raise ImageDecodeError(f"unsupported or corrupt TIFF: {_short(e)}") from e
    grey = values.shape[2] in (1, 2)
    if meta["photometric"] != (1 if grey else 2):  # MINISBLACK for grey, RGB for colour
        raise ImageDecodeError(f"unsupported TIFF photometric interpretation {meta['photometric']}")
    notes: list[str] = []
    _check_frames("TIFF", meta["pages"], notes)
    orientation = meta["orientation"] if 1 <= meta["orientation"] <= 8 else 1
    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[values.shape[2]]
    depth = 16 if values.dtype == np.uint16 else 8
    return _finish(_orient(values, orientation), depth, "TIFF", mode, meta["icc_profile"],
                   _tiff_only_exif(data, notes), orientation, notes)


def _tiff_only_exif(data: bytes, notes: list[str]) -> bytes | None:
    """The EXIF of a TIFF Pillow cannot open: Pillow's EXIF reader still parses its tags."""
    if data[2:4] not in (b"*\x00", b"\x00*"):
        notes.append("EXIF not read (BigTIFF)")
        return None
    try:
        source = Image.Exif()
        source.load(data)  # a classic TIFF's first directory reads as an EXIF block
        return _tiff_exif(source)
    except Exception as e:  # noqa: BLE001  a broken EXIF block must not fail a good image
        notes.append(f"unreadable EXIF ignored ({_short(e)})")
        return None


_JXL_CODESTREAM = b"\xff\x0a"
_JXL_CONTAINER = b"\x00\x00\x00\x0cJXL \r\n\x87\n"
_JXL_RATIOS = {1: (1, 1), 2: (12, 10), 3: (4, 3), 4: (3, 2), 5: (16, 9), 6: (5, 4), 7: (2, 1)}


def _is_jxl(data: bytes) -> bool:
    return data[:2] == _JXL_CODESTREAM or data[:12] == _JXL_CONTAINER


def _jxl_codestream(data: bytes) -> bytes:
    """The codestream's start: the file itself, or the payload of its container's first jxlc/jxlp box."""
    if data[:2] == _JXL_CODESTREAM:
        return data
    at = 0
    while at + 8 <= len(data):
        size, kind = struct.unpack_from(">I4s", data, at)
        header = 8
        if size == 1:
            size, header = struct.unpack_from(">Q", data, at + 8)[0], 16
        elif size == 0:
            size = len(data) - at
        if kind in (b"jxlc", b"jxlp"):
            return data[at + header + (4 if kind == b"jxlp" else 0):at + size]
        if size < header:
            raise ValueError("malformed JPEG XL box")
        at += size
    raise ValueError("no JPEG XL codestream in the bytes read")


def _jxl_size(data: bytes) -> tuple[int, int]:
    """Width and height from a JPEG XL SizeHeader (ISO/IEC 18181-1), before any pixel is decoded."""
    code = _jxl_codestream(data)
    if code[:2] != _JXL_CODESTREAM or len(code) < 11:  # the SizeHeader takes at most 68 bits
        raise ValueError("JPEG XL size header not in the bytes read")
    bits, pos = int.from_bytes(code[2:11], "little"), 0  # read least significant bit first

    def read(n: int) -> int:
        nonlocal pos
        value = (bits >> pos) & ((1 << n) - 1)
        pos += n
        return value

    def dimension(small: int) -> int:
        return 8 * (read(5) + 1) if small else read((9, 13, 18, 30)[read(2)]) + 1

    small = read(1)
    height = dimension(small)
    ratio = read(3)
    if ratio:
        num, den = _JXL_RATIOS[ratio]
        return height * num // den, height
    return dimension(small), height


def _decode_jxl(data: bytes, max_pixels: int) -> Decoded:
    """JPEG XL via imagecodecs (libjxl), which applies the codestream's orientation itself."""
    try:
        width, height = _jxl_size(data)
    except (ValueError, struct.error) as e:
        raise ImageDecodeError(f"unreadable image header: {_short(e)}") from e
    check_pixels(width, height, max_pixels)
    try:
        import imagecodecs
    except ImportError:
        raise ImageDecodeError("JPEG XL needs the imagecodecs package, not installed here") from None
    try:
        values = imagecodecs.jpegxl_decode(data, index=0)  # an animation gives its first frame
    except Exception as e:  # noqa: BLE001  imagecodecs raises its own error types
        raise ImageDecodeError(f"truncated or corrupt image: {_short(e)}") from e
    values = values[..., None] if values.ndim == 2 else values
    notes: list[str] = []
    if np.issubdtype(values.dtype, np.floating):
        values = to_uint16(np.nan_to_num(values.astype(np.float32)))
        notes.append("floating-point JPEG XL stored as 16-bit")
    if values.dtype not in (np.uint8, np.uint16) or values.ndim != 3 or not 1 <= values.shape[2] <= 4:
        raise ImageDecodeError(f"unsupported JPEG XL samples: {values.dtype} {values.shape}")
    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[values.shape[2]]
    depth = 16 if values.dtype == np.uint16 else 8
    return _finish(np.ascontiguousarray(values), depth, "JXL", mode, None, None, 1, notes)


def _orientation_and_exif(im: Image.Image, notes: list[str]) -> tuple[int, bytes | None]:
    """The EXIF orientation to apply, and the raw EXIF to keep with Orientation removed."""
    try:
        raw = im.info.get("exif")
        orientation, kept = 1, None
        if raw:
            exif = Image.Exif()
            exif.load(raw)
            orientation = int(exif.pop(_ORIENTATION, 1))
            kept = exif.tobytes()
        elif im.format == "TIFF":  # the tags are the TIFF's own (Image.getexif reads them unloaded)
            source = im.getexif()
            orientation = int(source.get(_ORIENTATION, 1))
            kept = _tiff_exif(source)
    except Exception as e:  # noqa: BLE001  a broken EXIF block must not fail a good image
        notes.append(f"unreadable EXIF ignored ({_short(e)})")
        return 1, None
    if not 1 <= orientation <= 8:
        notes.append(f"invalid EXIF orientation {orientation} ignored")
        orientation = 1
    return orientation, kept


def _tiff_exif(source: Image.Exif) -> bytes | None:
    """A TIFF's descriptive tags as an EXIF block; its layout tags would be wrong for any output."""
    exif = Image.Exif()
    found = False
    for tag in _TIFF_DESCRIPTIVE_TAGS:
        if tag in source:
            exif[tag] = source[tag]
            found = True
    for pointer in _EXIF_SUB_IFDS:
        sub = source.get_ifd(pointer)
        if sub:
            exif.get_ifd(pointer).update(sub)
            found = True
    return exif.tobytes() if found else None


def _orient(a: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation to HxW(xC) data, as ImageOps.exif_transpose would."""
    if orientation == 2:
        return a[:, ::-1]
    if orientation == 3:
        return a[::-1, ::-1]
    if orientation == 4:
        return a[::-1]
    if orientation == 5:
        return a.swapaxes(0, 1)
    if orientation == 6:
        return np.rot90(a, -1)
    if orientation == 7:
        return a.swapaxes(0, 1)[::-1, ::-1]
    if orientation == 8:
        return np.rot90(a, 1)
    return a


def _finish(values: np.ndarray, bit_depth: int, fmt: str, mode: str, icc: bytes | None,
            exif: bytes | None, orientation: int, notes: list[str]) -> Decoded:
    """Upright integer samples -> Decoded (float pixels, alpha split off)."""
    colour = 1 if values.shape[2] in (1, 2) else 3
    scale = np.float32(np.iinfo(values.dtype).max)
    pixels = values[..., :colour].astype(np.float32) / scale
    alpha = values[..., colour].astype(np.float32) / scale if values.shape[2] in (2, 4) else None
    return Decoded(pixels=pixels, alpha=alpha, bit_depth=bit_depth, format=fmt, mode=mode,
                   icc_profile=icc, exif=exif, orientation=orientation, notes=notes)


# ---------------------------------------------------------------------------------------------
# encoding


def encode(pixels: np.ndarray, alpha: np.ndarray | None, format: str, bit_depth: int = 8,
           icc_profile: bytes | None = None, exif: bytes | None = None, quality: int = 95,
           lossless: bool = False) -> bytes:
    """Encode float [0, 1] pixels (HxWxC, C 1 or 3) and optional alpha (HxW) to image bytes.

    ``quality`` applies to JPEG and lossy WEBP; ``lossless`` makes a WEBP lossless (every 8-bit
    sample as given, colour under transparent pixels too).

    Values outside [0, 1] saturate. bit_depth 16 is written for PNG and TIFF and silently becomes 8
    for the 8-bit-only formats. JPEG and BMP composite alpha onto white. ICC and EXIF are kept where the
    format has room (all but BMP, which keeps neither: see `EXIF_FORMATS`).
    """
    fmt = normalise_format(format)
    _check_arrays(pixels, alpha)
    if bit_depth not in (8, 16):
        raise ValueError(f"bit_depth must be 8 or 16, got {bit_depth}")
    if fmt not in SIXTEEN_BIT_FORMATS:
        bit_depth = 8
    if fmt not in ALPHA_FORMATS and alpha is not None:
        a = np.clip(alpha, 0.0, 1.0)[..., None]
        pixels = pixels * a + (1.0 - a)
        alpha = None
    stacked = pixels if alpha is None else np.concatenate([pixels, alpha[..., None]], axis=2)
    if bit_depth == 16:
        values = to_uint16(stacked)
        return _png16(values, icc_profile, exif) if fmt == "PNG" else _tiff16(values, icc_profile, exif)
    return _pillow_encode(to_uint8(stacked), fmt, icc_profile, exif, quality, lossless)


def _check_arrays(pixels: np.ndarray, alpha: np.ndarray | None) -> None:
    if not isinstance(pixels, np.ndarray) or pixels.ndim != 3 or pixels.shape[2] not in (1, 3):
        shape = getattr(pixels, "shape", None)
        raise ValueError(f"pixels must be an HxWxC array with C 1 or 3, got shape {shape}")
    if pixels.shape[0] == 0 or pixels.shape[1] == 0:
        raise ValueError(f"pixels have no area: shape {pixels.shape}")
    if not np.issubdtype(pixels.dtype, np.floating):
        raise ValueError(f"pixels must be floats in [0, 1], got dtype {pixels.dtype}")
    if not np.isfinite(pixels).all():
        raise ValueError("pixels contain NaN or infinity")
    if alpha is not None:
        if not isinstance(alpha, np.ndarray) or alpha.shape != pixels.shape[:2]:
            raise ValueError(f"alpha must be HxW {pixels.shape[:2]}, got {getattr(alpha, 'shape', None)}")
        if not np.issubdtype(alpha.dtype, np.floating) or not np.isfinite(alpha).all():
            raise ValueError("alpha must be finite floats in [0, 1]")


def _pillow_encode(values: np.ndarray, fmt: str, icc: bytes | None, exif: bytes | None,
                   quality: int, lossless: bool = False) -> bytes:
    im = Image.fromarray(values[..., 0] if values.shape[2] == 1 else values)
    if fmt == "WEBP" and im.mode == "LA":  # WEBP has no grey+alpha
        im = im.convert("RGBA")
    options: dict = {}
    if fmt == "JPEG":
        # 4:4:4: chroma subsampling would halve the colour resolution the model just restored.
        options = {"quality": quality, "subsampling": 0}
    elif fmt == "WEBP":
        options = {"lossless": True, "exact": True} if lossless else {"quality": quality}
    elif fmt == "TIFF":
        options = {"compression": "tiff_adobe_deflate"}
    if fmt != "BMP":
        if icc:
            options["icc_profile"] = icc
        if exif:
            options["exif"] = exif
    buf = io.BytesIO()
    im.save(buf, format=fmt, **options)
    return buf.getvalue()


def _tiff16(values: np.ndarray, icc: bytes | None, exif: bytes | None) -> bytes:
    """A 16-bit TIFF via tifffile (Pillow cannot write 16-bit colour), with the EXIF's descriptive
    tags in its directory and its Exif/GPS sub-directories linked from there."""
    c = values.shape[2]
    source = Image.Exif()
    if exif:
        source.load(exif)
    tags = [(tag, "s", 0, _tiff_ascii(source[tag]), True)
            for tag in _TIFF_DESCRIPTIVE_TAGS if isinstance(source.get(tag), (str, bytes))]
    pointers = [p for p in _EXIF_SUB_IFDS if source.get_ifd(p)]
    # Placeholders for the sub-directory offsets, filled in below. tifffile refuses these tags
    # by number, since it cannot write their directories itself, but takes them by name.
    tags += [(tifffile.TIFF.TAGS[p], "I", 1, 0, True) for p in pointers]
    buf = io.BytesIO()
    tifffile.imwrite(
        buf,
        values[..., 0] if c == 1 else values,
        byteorder="<",
        photometric="rgb" if c in (3, 4) else "minisblack",
        planarconfig="contig" if c > 1 else None,
        extrasamples=("unassalpha",) if c in (2, 4) else None,
        compression="zlib",
        iccprofile=icc or None,
        metadata=None,
        software=False if 305 in (t[0] for t in tags) else None,
        extratags=tags,
    )
    data = buf.getvalue()
    return _append_sub_ifds(data, source, pointers) if pointers else data


def _tiff_ascii(value: str | bytes) -> bytes:
    # Pillow reads TIFF/EXIF ASCII as Latin-1: encoding it back gives the stored bytes again.
    return value if isinstance(value, bytes) else value.encode("latin-1", "replace")


def _append_sub_ifds(data: bytes, source: Image.Exif, pointers: list[int]) -> bytes:
    """Append the Exif/GPS sub-directories of ``source`` to a little-endian classic TIFF and point
    its first directory's placeholder tags at them."""
    base = len(data) + len(data) % 2  # directories start on a word boundary
    subs = Image.Exif()
    subs.endian = "<"
    for pointer in pointers:
        subs.get_ifd(pointer).update(source.get_ifd(pointer))
    # Pillow lays out a directory of just the pointers, then the sub-directories, for a file
    # position of `base`; that directory is left unreferenced, the offsets in it are what is needed.
    block = subs.tobytes(base)[len(b"Exif\x00\x00") + 8:]
    offsets = {}
    for i in range(struct.unpack_from("<H", block)[0]):
        tag, _, _, value = struct.unpack_from("<HHII", block, 2 + 12 * i)
        offsets[tag] = value
    out = bytearray(data)
    ifd = struct.unpack_from("<I", out, 4)[0]
    for i in range(struct.unpack_from("<H", out, ifd)[0]):
        entry = ifd + 2 + 12 * i
        tag = struct.unpack_from("<H", out, entry)[0]
        if tag in offsets:
            struct.pack_into("<I", out, entry + 8, offsets[tag])
    out += b"\x00" * (base - len(out))
    return bytes(out + block)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png16(values: np.ndarray, icc: bytes | None, exif: bytes | None) -> bytes:
    """A 16-bit PNG (grey, grey+alpha, RGB, RGBA), which Pillow cannot write for colour.

    Rows are Paeth-filtered and compressed in blocks so memory stays a few MB above the input.
    """
    h, w, c = values.shape
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    rows = values.astype(">u2").reshape(h, w * c).view(np.uint8)
    bpp = 2 * c
    header = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)  # 16 bits, no interlace
    parts = [b"\x89PNG\r\n\x1a\n", _png_chunk(b"IHDR", header)]
    if icc:
        parts.append(_png_chunk(b"iCCP", b"ICC Profile\x00\x00" + zlib.compress(icc)))
    if exif:
        parts.append(_png_chunk(b"eXIf", exif[6:] if exif.startswith(b"Exif\x00\x00") else exif))
    compressor = zlib.compressobj(6)
    compressed = []
    block = max(1, (4 << 20) // rows.shape[1])
    previous = np.zeros((1, rows.shape[1]), np.uint8)
    for start in range(0, h, block):
        cur = rows[start:start + block]
        up = np.concatenate([previous, cur[:-1]])
        filtered = _paeth(cur, up, bpp)
        marked = np.concatenate([np.full((cur.shape[0], 1), 4, np.uint8), filtered], axis=1)
        compressed.append(compressor.compress(marked.tobytes()))
        previous = cur[-1:]
    compressed.append(compressor.flush())
    idat = b"".join(compressed)
    for i in range(0, max(len(idat), 1), 1 << 20):
        parts.append(_png_chunk(b"IDAT", idat[i:i + (1 << 20)]))
    parts.append(_png_chunk(b"IEND", b""))
    return b"".join(parts)


def _paeth(cur: np.ndarray, up: np.ndarray, bpp: int) -> np.ndarray:
    """PNG filter type 4 for a block of rows (uint8), given the rows above them."""
    x = cur.astype(np.int16)
    b = up.astype(np.int16)
    a = np.zeros_like(x)
    a[:, bpp:] = x[:, :-bpp]
    c = np.zeros_like(b)
    c[:, bpp:] = b[:, :-bpp]
    p = a + b - c
    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
    pred = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
    return (x - pred).astype(np.uint8)
