"""Uploaded images: limits, decoding with Pillow, labelled uploads and zip archives.

Only image files are decoded: ``Image.open`` is restricted to the formats in ``FORMATS``, the
pixel count is checked from the header before any pixel is decoded (Pillow's own
decompression-bomb guard stays on above that), and every image is fully decoded once on arrival,
so a truncated or malformed file is refused with the request rather than failing a learn job.
Zip archives are read in memory, entry by entry with bounded reads; no name from a client is ever
used as a path on disk (stored images get server-chosen names), and an entry whose name could
escape a folder (absolute, ``..``, backslashes, drive letters, symlinks) refuses the whole upload.
Nothing a client sends is unpickled.
"""

from __future__ import annotations

import base64
import binascii
import io
import stat
import zipfile
from dataclasses import dataclass, fields
from pathlib import PurePosixPath

from PIL import Image, UnidentifiedImageError

from ..errors import ServeError

FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP")
EXTENSIONS = {"PNG": ".png", "JPEG": ".jpg", "BMP": ".bmp", "GIF": ".gif", "WEBP": ".webp"}
MAX_NAME = 100  # characters of a class name


@dataclass(frozen=True)
class Limits:
    """What one request may carry; exceeding a limit answers 413 naming it."""

    max_request_bytes: int = 64 << 20  # the whole request body
    max_image_bytes: int = 16 << 20  # one encoded image (also one zip entry, uncompressed)
    max_image_pixels: int = 40_000_000  # width x height of one image
    max_predict_images: int = 64  # images in one /predict request
    max_learn_images: int = 5000  # images in one /learn request (zip entries included)

    def describe(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class Upload:
    """One decoded image: its encoded bytes, Pillow format, RGB pixels and its client name."""

    data: bytes
    format: str
    image: Image.Image  # RGB, fully decoded
    name: str = ""
    label: str | None = None

    @property
    def extension(self) -> str:
        return EXTENSIONS[self.format]


def too_large(what: str, size: int, limit_name: str, limit: int) -> ServeError:
    return ServeError(413, f"{what} is {size} bytes, over the limit {limit_name}={limit}")


def decode(data: bytes, limits: Limits, name: str = "image", label: str | None = None) -> Upload:
    """``data`` decoded as one image; ServeError 413 over a limit, 422 if it is no image."""
    if len(data) > limits.max_image_bytes:
        raise too_large(name, len(data), "max_image_bytes", limits.max_image_bytes)
    try:
        im = Image.open(io.BytesIO(data), formats=list(FORMATS))
    except Image.DecompressionBombError as e:  # Pillow's own guard, from the header
        raise ServeError(413, f"{name}: {e} (limit max_image_pixels="
                              f"{limits.max_image_pixels})") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ServeError(422, f"{name} is not an image in an accepted format "
                              f"({', '.join(FORMATS)}): {type(e).__name__}") from None
    w, h = im.size
    if w * h > limits.max_image_pixels:
        raise ServeError(413, f"{name} has {w}x{h} = {w * h} pixels, over the limit "
                              f"max_image_pixels={limits.max_image_pixels}")
    try:
        im.load()
        rgb = im.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ServeError(422, f"{name} could not be decoded as {im.format}: "
                              f"{type(e).__name__}: {str(e)[:120]}") from None
    return Upload(data, im.format, rgb, name, label)


def from_base64(text: str, name: str) -> bytes:
    """Base64 text (optionally a ``data:image/...;base64,`` URL) -> bytes; 422 if malformed."""
    if not isinstance(text, str):
        raise ServeError(422, f"{name}: expected a base64 string, got {type(text).__name__}")
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ServeError(422, f"{name} is not valid base64") from None


def class_name(label: object, where: str) -> str:
    """A class name from a client: a non-empty printable string of at most MAX_NAME chars."""
    if not isinstance(label, str) or not label.strip():
        raise ServeError(422, f"{where}: a class name must be a non-empty string")
    label = label.strip()
    if len(label) > MAX_NAME or not label.isprintable():
        raise ServeError(422, f"{where}: class name {label[:40]!r}... must be printable and at "
                              f"most {MAX_NAME} characters")
    return label


def label_from_path(path: str, where: str) -> str:
    """The class of an image named ``<...>/<class>/<image>``: its parent folder."""
    parts = safe_parts(path, where)
    if len(parts) < 2:
        raise ServeError(422, f"{where}: {path!r} is not inside a class folder "
                              f"(expected <class>/<image>)")
    return class_name(parts[-2], where)


def safe_parts(path: str, where: str) -> tuple[str, ...]:
    """The parts of a relative POSIX path that cannot leave its folder; 422 otherwise."""
    bad = (not path or path.startswith(("/", "\\")) or "\\" in path or "\x00" in path
           or (len(path) > 1 and path[1] == ":"))
    parts = PurePosixPath(path).parts
    if bad or any(p in ("..", ".", "") for p in parts):
        raise ServeError(422, f"{where}: the path {path!r} would escape the upload folder "
                              f"(absolute paths, '..' and backslashes are refused)")
    return parts


def hidden(parts: tuple[str, ...]) -> bool:
    """Entries that are not images of the upload: __MACOSX/ forks, .DS_Store and other dotfiles."""
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def read_zip(data: bytes, limits: Limits, where: str = "zip") -> list[Upload]:
    """The images of a zip of ``<class>/<image>`` folders (any folders above are ignored)."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError, ValueError):
        raise ServeError(422, f"{where} is not a valid zip archive") from None
    out: list[Upload] = []
    with archive:
        entries = [i for i in archive.infolist() if not i.is_dir()]
        for info in entries:  # check every name before reading anything
            parts = safe_parts(info.filename, where)
            if stat.S_ISLNK(info.external_attr >> 16):
                raise ServeError(422, f"{where}: {info.filename!r} is a symbolic link; "
                                      f"links are refused")
            if info.file_size > limits.max_image_bytes and not hidden(parts):
                raise too_large(f"{where}: {info.filename!r}", info.file_size,
                                "max_image_bytes", limits.max_image_bytes)
        entries = [i for i in entries if not hidden(PurePosixPath(i.filename).parts)]
        if len(entries) > limits.max_learn_images:
            raise ServeError(413, f"{where} holds {len(entries)} images, over the limit "
                                  f"max_learn_images={limits.max_learn_images}")
        for info in entries:
            label = label_from_path(info.filename, where)
            with archive.open(info) as f:
                raw = f.read(limits.max_image_bytes + 1)  # bounded: sizes in headers can lie
            out.append(decode(raw, limits, f"{where}: {info.filename}", label))
    return out


def is_zip(data: bytes) -> bool:
    return data[:4] == b"PK\x03\x04"
