"""An image pipeline to run as an :class:`~batchtrack.Orchestrator` processor.

Needs Pillow: ``pip install 'batchtrack[images]'``.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any, cast

try:
    from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError
except ImportError as exc:  # pragma: no cover - depends on the environment
    from ._extras import missing

    raise ImportError(missing("batchtrack.imaging", "Pillow", "images")) from exc

import attrs

from ._models import Item
from .exceptions import ProcessingError, ValidationError
from .files import open_location
from .files.base import FileStorage, check_key
from .files.local import LocalFiles
from .files.results import ResultFiles, _names_a_file

__all__ = ["INPUT_FORMATS", "MAX_PIXELS", "OUTPUT_FORMATS", "TRUNCATED", "ImagePipeline"]

MAX_PIXELS = 50_000_000
"""Images with more pixels than this (e.g. 8,000 x 6,250) are refused before decoding."""

INPUT_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
"""What the pipeline accepts, recognised by content, never by file name."""

OUTPUT_FORMATS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp"}
"""What it writes, with the file extension used."""

TRUNCATED = "truncated image: the file ends early"
"""The error of an image whose file was cut short (an upload broken off, a partial copy)."""

_ALIASES = {"JPG": "JPEG"}
_METADATA_KEYS = ("exif", "xmp", "XML:com.adobe.xmp", "comment", "dpi", "photoshop")


def _check_format(value: str | None) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValidationError(f"format must be a string like 'JPEG', not {value!r}")
    name = _ALIASES.get(value.upper(), value.upper())
    if name not in OUTPUT_FORMATS:
        raise ValidationError(
            f"format must be one of {', '.join(OUTPUT_FORMATS)} (or None), not {value!r}"
        )
    return name


def _output(value: str | os.PathLike[str] | FileStorage) -> Path | FileStorage:
    return value if isinstance(value, FileStorage) else Path(value)


def _too_large(width: int, height: int, limit: int) -> ProcessingError:
    """The one error of an image with more pixels than ``limit``."""
    return ProcessingError(
        f"image too large: {width:,} x {height:,} pixels (the limit is {limit:,})"
    )


def _header_size(source: Any) -> tuple[int, int] | None:
    """The width and height an image's header declares, read without Pillow's own
    decompression-bomb check (which refused it before our limit could); None when no
    accepted format reads it."""
    with contextlib.ExitStack() as stack:
        if isinstance(source, (str, os.PathLike)):
            source = stack.enter_context(open(source, "rb"))
        for name in INPUT_FORMATS:
            factory, accept = Image.OPEN[name]
            try:
                source.seek(0)
                prefix = source.read(16)
                source.seek(0)
                if accept is None or accept(prefix):
                    return factory(source, "").size
            except Exception:  # not this format, or unreadable: try the next
                continue
    return None


def _text_bomb(exc: ValueError) -> ProcessingError | None:
    """The error for a PNG whose compressed text chunks would inflate past Pillow's
    limits (a decompression bomb in metadata); None for any other ValueError."""
    text = str(exc)
    if "MAX_TEXT_CHUNK" in text:  # one chunk too large
        limit = PngImagePlugin.MAX_TEXT_CHUNK
    elif "text chunks" in text:  # all of them: "Too much memory used in text chunks"
        limit = PngImagePlugin.MAX_TEXT_MEMORY
    else:
        return None
    return ProcessingError(
        f"refused: the PNG's text chunks decompress to more than {limit:,} bytes "
        "(a decompression bomb)"
    )


def _is_truncated(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "truncated" in text or "broken" in text or isinstance(exc, (SyntaxError, EOFError))


def _check_int(value: int, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValidationError(f"{what} must be a whole number from {low} to {high}, not {value!r}")
    return value


@attrs.frozen
class ImagePipeline:
    """Orient, shrink, strip and re-encode one image per item; picklable.

    For each item it opens the item's ``source`` (a path, bytes or a binary file), checks
    by content that it is an image of an accepted format, refuses decompression bombs
    before decoding, applies the EXIF orientation, fits the image inside
    ``max_size`` x ``max_size`` (decoding large JPEGs at reduced size when the target is
    much smaller), removes EXIF (GPS included), XMP and comments while keeping the ICC
    colour profile, and writes the result atomically into ``output_dir`` as
    ``<item id><extension>``: exactly one file per image, nothing else left behind.

    The output may be a folder or a :class:`~batchtrack.files.FileStorage` (object
    storage shared by every machine: :func:`batchtrack.files.from_url`); an item's
    ``source`` may be a path, bytes, a binary file, or the location of a file in a
    storage (an upload's :attr:`~batchtrack.uploads.StoredFile.location`, such as
    ``s3://bucket/prefix/uploads/<id>``). Either way a reader never sees half a result.

    Args:
        output_dir: Where results go: a folder (created, with its parents, when
            missing) or a file storage.
        prefix: Where in a file storage results go (``""`` or ending in ``/``, such as
            ``"results/"``).
        max_size: The longest side of a result, in pixels (never enlarged).
        format: ``"JPEG"``, ``"PNG"`` or ``"WEBP"``; None keeps JPEG, PNG and WebP as
            they are and writes other formats as PNG.
        quality: JPEG and WebP quality, 1-100.
        strip_metadata: False keeps EXIF (with the orientation applied and reset).
        max_pixels: The decompression-bomb limit (width x height).

    Returns (when called):
        The path of the written file (its location, such as an ``s3://`` URL, when the
        output is object storage).

    Raises:
        ValidationError: A setting is out of range, or ``output_dir`` is a file (or lies
            under one) or cannot be created.

    Raises (when called):
        ProcessingError: With a short message for users: "not an image", "unsupported
            image format: ICO", "truncated image: the file ends early", "image too large:
            W x H pixels (the limit is N)", "refused: the PNG's text chunks decompress
            to more than N bytes (a decompression bomb)", "file not found".
        FileStorageError (when called): The file storage could not be reached (after
            its own retries with back-off); nothing was written.
    """

    output_dir: Path | FileStorage = attrs.field(converter=_output)
    max_size: int = attrs.field(default=2048, kw_only=True)
    format: str | None = attrs.field(default=None, kw_only=True, converter=_check_format)
    quality: int = attrs.field(default=85, kw_only=True)
    strip_metadata: bool = attrs.field(default=True, kw_only=True)
    max_pixels: int = attrs.field(default=MAX_PIXELS, kw_only=True)
    prefix: str = attrs.field(default="", kw_only=True)
    results: ResultFiles = attrs.field(init=False, eq=False, repr=False)
    """Where the results are: the files the HTTP API serves and removal hooks delete."""

    def __attrs_post_init__(self) -> None:
        _check_int(self.max_size, "max_size", 1, 65_535)
        _check_int(self.quality, "quality", 1, 100)
        _check_int(self.max_pixels, "max_pixels", 1, 2**40)
        if not isinstance(self.prefix, str) or (self.prefix and not self.prefix.endswith("/")):
            raise ValidationError(f"prefix must be '' or end with '/', not {self.prefix!r}")
        if self.prefix:
            check_key(self.prefix.rstrip("/"))
        if isinstance(self.output_dir, FileStorage):
            object.__setattr__(self, "results", ResultFiles(self.output_dir, self.prefix))
            return
        where = str(self.output_dir)
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            # The path, or one of its parents, is a file: never replace it.
            raise ValidationError(f"output_dir {where!r} is not a folder") from None
        except OSError as exc:
            raise ValidationError(
                f"cannot create output_dir {where!r}: {exc.strerror or exc}"
            ) from None
        storage = LocalFiles(self.output_dir)
        object.__setattr__(self, "results", ResultFiles(storage, self.prefix))

    def __call__(self, item: Item | str | os.PathLike[str]) -> Path | str:
        """Process one item, or one file given by its path; return the path written.

        A path (``str`` or :class:`os.PathLike`) is an item whose source is that path,
        its result named after the file: ``ImagePipeline("out")("photo.jpg")`` writes
        ``out/photo.jpg``.

        Raises:
            TypeError: ``item`` is neither an :class:`~batchtrack.Item` nor a path.
            ValidationError: The item's id (a path's file name) cannot name a file.
            ProcessingError: The input cannot be made into a result (see the class).
        """
        if not isinstance(item, Item):
            item = _path_item(item)
        if not _names_a_file(item.id):
            # The id names the output file: it must not be able to leave output_dir.
            raise ValidationError(f"item id {item.id!r} cannot name a file")
        with self._open(item) as image:
            fmt = self.format or (image.format if image.format in OUTPUT_FORMATS else "PNG")
            result, params = self._transform(image, fmt)
        return self._write(result, fmt, params, item.id)

    def remove_results(self, batch_id: str, item_ids: Iterable[str]) -> int:
        """Delete the result files of these items; return how many files went.

        Results live as long as their batch: register this as the tracker's removal hook,
        ``tracker.add_removal_hook(pipeline.remove_results)``, and deleting or expiring a
        batch removes its results (``batchtrack serve`` does this).
        """
        return self.results.remove(batch_id, item_ids)

    def sweep_partial(self, older_than: float = 3600.0) -> int:
        """Delete temporary files of writes that never finished (a process killed while
        writing), once they are ``older_than`` seconds old; return how many went.

        Writes in progress are seconds old, so the default hour never touches one.
        Object storage leaves nothing visible of an unfinished write (0).
        """
        return self.results.sweep_partial(older_than)

    @contextlib.contextmanager
    def _open(self, item: Item) -> Any:
        source = item.filename if item.source is None else item.source
        if isinstance(source, (bytes, bytearray, memoryview)):
            source = io.BytesIO(source)
        try:
            source = self._fetch(source)
            image = Image.open(source, formats=None)
        except FileNotFoundError:
            raise ProcessingError("file not found") from None
        except IsADirectoryError:
            raise ProcessingError("not an image (a folder)") from None
        except Image.DecompressionBombError:
            # Pillow's own limit (twice its MAX_IMAGE_PIXELS) struck first; say it as
            # our limit does, with the size the header declares.
            size = _header_size(source)
            if size is None:
                raise ProcessingError(
                    f"image too large: more than {self.max_pixels:,} pixels"
                ) from None
            raise _too_large(*size, self.max_pixels) from None
        except UnidentifiedImageError:
            raise ProcessingError("not an image") from None
        except ValueError as exc:
            bomb = _text_bomb(exc)
            if bomb is not None:
                raise bomb from None
            raise ProcessingError(f"cannot decode the image ({exc})") from None
        except (OSError, EOFError) as exc:
            if _is_truncated(exc):
                raise ProcessingError(TRUNCATED) from None
            reason = exc.strerror if isinstance(exc, OSError) else None
            raise ProcessingError(f"cannot read the file ({reason or exc})") from None
        try:
            if image.format not in INPUT_FORMATS:
                raise ProcessingError(f"unsupported image format: {image.format}")
            width, height = image.size
            if width * height > self.max_pixels:
                raise _too_large(width, height, self.max_pixels)
            yield image
        finally:
            image.close()

    def _fetch(self, source: Any) -> Any:
        """A source Pillow can open: a location in a file storage is read into memory."""
        if not isinstance(source, str):
            return source
        storage = self.results.storage
        key = storage.key_of(source)
        if key is not None and storage.local_path(key) is None:
            return io.BytesIO(storage.read_bytes(key))
        if key is None and "://" in source:
            with open_location(source) as file:
                return io.BytesIO(file.read())
        return source

    def _transform(self, image: Image.Image, fmt: str) -> tuple[Image.Image, dict[str, Any]]:
        icc = image.info.get("icc_profile")
        if image.format == "JPEG" and max(image.size) >= 2 * self.max_size:
            # Decode at 1/2, 1/4 or 1/8 scale straight away: far less work than decoding
            # everything and throwing most of it away. draft keeps both sides >= target.
            scale = self.max_size / max(image.size)
            image.draft(image.mode, (int(image.width * scale), int(image.height * scale)))
        try:
            image.load()
            oriented = ImageOps.exif_transpose(image)
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            bomb = _text_bomb(exc) if isinstance(exc, ValueError) else None
            if bomb is not None:
                raise bomb from None
            if _is_truncated(exc):
                raise ProcessingError(TRUNCATED) from None
            raise ProcessingError(f"cannot decode the image ({exc})") from None
        oriented.thumbnail((self.max_size, self.max_size), Image.Resampling.LANCZOS)
        result = _for_format(oriented, fmt)
        params: dict[str, Any] = {}
        if icc:
            params["icc_profile"] = icc
        if not self.strip_metadata:
            exif = oriented.getexif()
            if exif:
                params["exif"] = exif.tobytes()
        if fmt in ("JPEG", "WEBP"):
            params["quality"] = self.quality
        for key in _METADATA_KEYS:
            result.info.pop(key, None)
        return result, params

    def _write(
        self, image: Image.Image, fmt: str, params: dict[str, Any], item_id: str
    ) -> Path | str:
        # The storage writes atomically: readers see the whole file or none. (No fsync: losing
        # the last results to a power cut is fine for a pipeline that can run again.)
        key = self.results.key(item_id, OUTPUT_FORMATS[fmt])
        storage = self.results.storage
        with storage.writer(key) as out:
            image.save(cast(IO[bytes], out), fmt, **params)
        return storage.local_path(key) or storage.location(key)


def _path_item(path: object) -> Item:
    """The item of a file given by its path: source the path, named after the file."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(
            "ImagePipeline takes an Item or a path (str or os.PathLike), not "
            f"{type(path).__name__}; for bytes or a file use Item(filename, source=...)"
        )
    text = os.fspath(path)
    if not isinstance(text, str):
        raise TypeError("ImagePipeline takes text paths, not bytes; decode the path first")
    name = os.path.basename(text.rstrip("/\\"))
    stem = os.path.splitext(name)[0]
    if not _names_a_file(stem):
        raise ValidationError(f"{text!r} names no file a result can be named after")
    return Item(name, source=path, id=stem)


def _for_format(image: Image.Image, fmt: str) -> Image.Image:
    """The image in a mode ``fmt`` can store; transparency goes onto white for JPEG."""
    if fmt == "JPEG":
        if image.mode in ("RGB", "L"):
            return image
        if image.mode in ("RGBA", "LA", "P", "PA") or "transparency" in image.info:
            rgba = image.convert("RGBA")
            background = Image.new("RGB", rgba.size, (255, 255, 255))
            background.paste(rgba, mask=rgba.getchannel("A"))
            return background
        return image.convert("RGB")
    if image.mode in ("RGB", "RGBA", "L", "LA") or (fmt == "PNG" and image.mode == "P"):
        return image
    return image.convert("RGBA" if "transparency" in image.info else "RGB")
