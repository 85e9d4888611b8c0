"""ImagePipeline on real JPEG, PNG and WebP files made here, broken files and a bomb."""

from __future__ import annotations

import io
import os
import pickle
import struct
import time
import zlib
from pathlib import Path

import pytest

pytest.importorskip("PIL")
from PIL import Image, PngImagePlugin

from batchtrack import BatchTracker, Item, Orchestrator, ProcessingError, Status
from batchtrack.imaging import TRUNCATED, ImagePipeline

ORIENTATION, GPS_IFD = 0x0112, 0x8825


def _jpeg_with_exif(path: Path, size: tuple[int, int] = (1600, 1200), orientation: int = 6) -> Path:
    image = Image.new("RGB", size, (200, 30, 30))
    image.paste((30, 30, 200), (0, 0, size[0] // 2, size[1] // 4))  # a marker in one corner
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    exif[0x010F] = "CameraMaker"
    exif.get_ifd(GPS_IFD).update({1: "N", 2: (52.0, 22.0, 1.0), 3: "E", 4: (13.0, 24.0, 5.0)})
    image.save(path, exif=exif.tobytes(), quality=90, comment=b"secret comment")
    return path


def _png_bomb(path: Path, side: int = 20_000) -> Path:
    """A real 400-megapixel 1-bit PNG: tiny on disk, 50 MB of zeros once inflated."""
    row = b"\x00" + b"\x00" * (side // 8)
    raw = zlib.compress(row * side, 9)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")
    )
    return path


@pytest.fixture
def out(tmp_path: Path) -> Path:
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


def _run(pipeline: ImagePipeline, *sources: object, name: str = "x") -> Path:
    return pipeline(Item(name, source=sources[0], id="item-1", batch_id="b"))


def test_jpeg_is_oriented_resized_and_stripped(tmp_path: Path, out: Path) -> None:
    """EXIF orientation is applied, the image fits max_size, EXIF/GPS/comment are gone."""
    src = _jpeg_with_exif(tmp_path / "photo.jpg")
    result = _run(ImagePipeline(out, max_size=512), src)
    assert result == out / "item-1.jpg"
    with Image.open(result) as image:
        assert image.format == "JPEG"
        assert image.size == (384, 512)  # 1600x1200 rotated by orientation 6, then fitted
        assert not image.getexif()
        assert "comment" not in image.info
        assert "exif" not in image.info
        # The blue marker was top-left; after a 90° clockwise turn it is top-right.
        assert image.getpixel((370, 10))[2] > 150
        assert image.getpixel((10, 10))[0] > 150


def test_png_with_alpha_keeps_format_and_transparency(tmp_path: Path, out: Path) -> None:
    """A PNG stays PNG with its alpha channel, shrunk to fit."""
    src = tmp_path / "a.png"
    Image.new("RGBA", (1000, 500), (0, 0, 255, 100)).save(src)
    result = _run(ImagePipeline(out, max_size=200), src)
    with Image.open(result) as image:
        assert (image.format, image.size, image.mode) == ("PNG", (200, 100), "RGBA")
        assert image.getpixel((5, 5))[3] == 100


def test_webp_to_jpeg_puts_transparency_on_white(tmp_path: Path, out: Path) -> None:
    """format='JPEG' converts a transparent WebP onto a white background."""
    src = tmp_path / "a.webp"
    Image.new("RGBA", (100, 100), (0, 0, 0, 0)).save(src, lossless=True)
    result = _run(ImagePipeline(out, format="jpg"), src)
    with Image.open(result) as image:
        assert image.format == "JPEG"
        assert image.getpixel((50, 50)) == (255, 255, 255)


def test_icc_profile_is_kept(tmp_path: Path, out: Path) -> None:
    """The ICC colour profile survives metadata stripping."""
    profile = b"\x00\x00\x02\x0cfake icc profile bytes" + b"\x00" * 500
    src = tmp_path / "icc.jpg"
    Image.new("RGB", (64, 64)).save(src, icc_profile=profile)
    with Image.open(_run(ImagePipeline(out), src)) as image:
        assert image.info.get("icc_profile") == profile


def test_metadata_kept_on_request(tmp_path: Path, out: Path) -> None:
    """strip_metadata=False keeps EXIF, with the orientation reset after applying it."""
    src = _jpeg_with_exif(tmp_path / "photo.jpg")
    with Image.open(_run(ImagePipeline(out, max_size=256, strip_metadata=False), src)) as image:
        exif = image.getexif()
        assert exif.get(0x010F) == "CameraMaker"
        assert exif.get(ORIENTATION, 1) == 1


def test_small_images_are_never_enlarged(tmp_path: Path, out: Path) -> None:
    """An image smaller than max_size keeps its size."""
    src = tmp_path / "small.png"
    Image.new("RGB", (40, 30)).save(src)
    with Image.open(_run(ImagePipeline(out, max_size=2048), src)) as image:
        assert image.size == (40, 30)


def test_content_decides_not_the_name(tmp_path: Path, out: Path) -> None:
    """A PNG named .jpg is read as the PNG it is; a text file named .png is refused."""
    disguised = tmp_path / "really-a-png.jpg"
    Image.new("RGB", (10, 10)).save(disguised, format="PNG")
    assert _run(ImagePipeline(out), disguised).suffix == ".png"
    text = tmp_path / "notes.png"
    text.write_text("hello")
    with pytest.raises(ProcessingError, match=r"^not an image$"):
        _run(ImagePipeline(out), text)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "not an image"),
        (b"garbage" * 100, "not an image"),
    ],
)
def test_broken_files_fail_with_a_short_message(
    tmp_path: Path, out: Path, content: bytes, message: str
) -> None:
    """Zero-byte and garbage files fail with a message for users; nothing is written."""
    src = tmp_path / "bad.jpg"
    src.write_bytes(content)
    with pytest.raises(ProcessingError, match=rf"^{message}$"):
        _run(ImagePipeline(out), src)
    assert list(out.iterdir()) == []


def test_truncated_jpeg_fails_and_leaves_nothing(tmp_path: Path, out: Path) -> None:
    """A JPEG cut in half fails as a truncated image and leaves no partial file."""
    whole = _jpeg_with_exif(tmp_path / "whole.jpg").read_bytes()
    src = tmp_path / "cut.jpg"
    src.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ProcessingError, match=r"^truncated image: the file ends early$"):
        _run(ImagePipeline(out), src)
    assert list(out.iterdir()) == []


def test_a_jpeg_cut_inside_its_header_reads_as_truncated(tmp_path: Path, out: Path) -> None:
    """A JPEG cut before its image data fails with the same short text, not Pillow's
    "cannot read the file (Truncated File Read)"."""
    whole = _jpeg_with_exif(tmp_path / "whole.jpg", size=(64, 64)).read_bytes()
    for length in (30, 200):
        with pytest.raises(ProcessingError) as caught:
            _run(ImagePipeline(out), whole[:length])
        assert str(caught.value) == TRUNCATED == "truncated image: the file ends early"
    assert list(out.iterdir()) == []


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_with_text_bomb(kind: bytes, *, after_image: bool) -> bytes:
    """A small valid PNG with one compressed text chunk (zTXt or iTXt) that inflates to
    just over Pillow's limit, before or after the image data."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, "PNG")
    png = buffer.getvalue()
    inflated = zlib.compress(b"a" * (PngImagePlugin.MAX_TEXT_CHUNK + 1), 9)
    header = b"Comment\x00\x00" if kind == b"zTXt" else b"Comment\x00\x01\x00\x00\x00"
    bomb = _chunk(kind, header + inflated)
    at = png.index(b"IEND" if after_image else b"IDAT") - 4
    return png[:at] + bomb + png[at:]


@pytest.mark.parametrize("kind", [b"zTXt", b"iTXt"])
@pytest.mark.parametrize("after_image", [False, True])
def test_a_png_text_bomb_is_refused_in_plain_words(
    out: Path, kind: bytes, after_image: bool
) -> None:
    """A PNG whose text chunk inflates past Pillow's limit fails with one short sentence
    that names the bomb, not "ValueError: Decompressed data too large ..."."""
    data = _png_with_text_bomb(kind, after_image=after_image)
    assert len(data) < 10_000
    with pytest.raises(ProcessingError) as caught:
        _run(ImagePipeline(out), data)
    limit = f"{PngImagePlugin.MAX_TEXT_CHUNK:,}"
    assert str(caught.value) == (
        f"refused: the PNG's text chunks decompress to more than {limit} bytes "
        "(a decompression bomb)"
    )
    assert list(out.iterdir()) == []


def test_unsupported_format_is_named(tmp_path: Path, out: Path) -> None:
    """An image in a format we do not accept (ICO) is refused by name."""
    src = tmp_path / "favicon.png"
    Image.new("RGB", (16, 16)).save(src, format="ICO")
    with pytest.raises(ProcessingError, match="unsupported image format: ICO"):
        _run(ImagePipeline(out), src)


def test_decompression_bomb_is_refused_before_decoding(tmp_path: Path, out: Path) -> None:
    """A 400-megapixel PNG bomb is refused with a clear message, without decoding it."""
    src = _png_bomb(tmp_path / "bomb.png")
    assert src.stat().st_size < 200_000
    with pytest.raises(ProcessingError) as caught:
        _run(ImagePipeline(out), src)
    # The text the docs give, also when Pillow's own limit strikes before ours.
    assert str(caught.value) == "image too large: 20,000 x 20,000 pixels (the limit is 50,000,000)"


def test_own_pixel_limit_is_enforced(tmp_path: Path, out: Path) -> None:
    """max_pixels refuses images over the limit with their size in the message."""
    src = tmp_path / "big.png"
    Image.new("L", (300, 200)).save(src)
    with pytest.raises(ProcessingError, match=r"300 x 200 pixels \(the limit is 50,000\)"):
        _run(ImagePipeline(out, max_pixels=50_000), src)


def test_missing_file_fails_cleanly(tmp_path: Path, out: Path) -> None:
    """A source that does not exist fails with 'file not found'."""
    with pytest.raises(ProcessingError, match=r"^file not found$"):
        _run(ImagePipeline(out), tmp_path / "nope.jpg")


def test_bytes_sources_work(out: Path) -> None:
    """The source may be the image's bytes."""
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (20, 20)).save(buffer, format="WEBP")
    assert _run(ImagePipeline(out), buffer.getvalue()).suffix == ".webp"


def test_pipeline_is_picklable(out: Path) -> None:
    """The pipeline pickles (for process pools) and comes back equal."""
    pipeline = ImagePipeline(out, max_size=300, format="PNG", quality=70)
    assert pickle.loads(pickle.dumps(pipeline)) == pipeline


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_size": 0}, "max_size"),
        ({"quality": 101}, "quality"),
        ({"format": "GIF"}, "format"),
        ({"max_pixels": -1}, "max_pixels"),
    ],
)
def test_bad_settings_are_rejected(out: Path, kwargs: dict[str, object], message: str) -> None:
    """Out-of-range settings raise ValidationError naming the setting."""
    from batchtrack import ValidationError

    with pytest.raises(ValidationError, match=message):
        ImagePipeline(out, **kwargs)  # type: ignore[arg-type]


def test_missing_output_dir_is_created_with_its_parents(tmp_path: Path) -> None:
    """ImagePipeline("out") in an empty folder creates out/ (parents too) and writes there."""
    target = tmp_path / "results" / "2026" / "small"
    pipeline = ImagePipeline(target, max_size=64)
    assert target.is_dir()
    written = _run(pipeline, _jpeg_with_exif(tmp_path / "a.jpg"))
    assert written.parent == target
    ImagePipeline(target)  # an existing folder is fine, and nothing in it is touched
    assert [p.name for p in target.iterdir()] == [written.name]


@pytest.mark.parametrize("where", ["file", "file/below"])
def test_output_dir_that_is_a_file_is_refused(tmp_path: Path, where: str) -> None:
    """A file in the way of output_dir is a ValidationError and is left untouched."""
    from batchtrack import ValidationError

    (tmp_path / "file").write_bytes(b"keep me")
    with pytest.raises(ValidationError, match="is not a folder"):
        ImagePipeline(tmp_path / where)
    assert (tmp_path / "file").read_bytes() == b"keep me"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_output_dir_that_cannot_be_created_is_refused(tmp_path: Path) -> None:
    """A folder that cannot be created (no permission) is a ValidationError naming it."""
    from batchtrack import ValidationError

    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        with pytest.raises(ValidationError, match="cannot create output_dir"):
            ImagePipeline(locked / "out")
    finally:
        locked.chmod(0o700)


@pytest.fixture
def mixed_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    _jpeg_with_exif(folder / "one.jpg")
    Image.new("RGBA", (800, 600), (0, 255, 0, 255)).save(folder / "two.png")
    Image.new("RGB", (700, 500)).save(folder / "three.webp")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff" + b"junk" * 50)
    return folder


def test_orchestrated_batch_writes_one_file_per_good_image(mixed_folder: Path, out: Path) -> None:
    """Through the orchestrator: good images become exactly one file each, nothing else."""
    with Orchestrator(BatchTracker(), ImagePipeline(out, max_size=256), concurrency=2) as orch:
        snap = orch.run(sorted(mixed_folder.iterdir()))
    statuses = {i.filename: (i.status, i.error) for i in snap.items}
    assert statuses["broken.jpg"][0] is Status.FAILED
    assert statuses["broken.jpg"][1] in ("not an image", "truncated image: the file ends early")
    done = {i.id for i in snap.items if i.status is Status.COMPLETED}
    assert len(done) == 3
    assert sorted(p.stem for p in out.iterdir()) == sorted(done)
    for path in out.iterdir():
        with Image.open(path) as image:
            assert max(image.size) <= 256
            assert not image.getexif().get_ifd(GPS_IFD)


def test_process_pool_runs_the_pipeline(mixed_folder: Path, out: Path) -> None:
    """The pipeline runs in a process pool too."""
    from concurrent.futures import ProcessPoolExecutor

    with (
        ProcessPoolExecutor(2) as pool,
        Orchestrator(BatchTracker(), ImagePipeline(out, max_size=128), executor=pool) as orch,
    ):
        snap = orch.run(sorted(mixed_folder.iterdir()))
    assert snap.progress.completed == 3
    assert len(list(out.iterdir())) == 3


# -- results live as long as their batch ------------------------------------------------------


def test_results_go_with_their_batch(tmp_path: Path) -> None:
    """With remove_results as a removal hook, expiring a batch deletes its result files
    and nothing else."""
    from batchtrack.testing import FakeClock

    (tmp_path / "in").mkdir()
    out = tmp_path / "out"
    out.mkdir()
    sources = []
    for n in range(3):
        sources.append(_jpeg_with_exif(tmp_path / "in" / f"{n}.jpg", size=(64, 48)))
    (out / "unrelated.txt").write_text("keep me")
    clock = FakeClock()
    tracker = BatchTracker(clock=clock, ttl=60)
    pipeline = ImagePipeline(out, max_size=32)
    tracker.add_removal_hook(pipeline.remove_results)
    with Orchestrator(tracker, pipeline) as orch:
        first = orch.run(sources[:2])
        second = orch.run(sources[2:])
    assert len(list(out.glob("*.jpg"))) == 3
    tracker.delete(second.batch_id)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{i.id}.jpg" for i in first.items] + ["unrelated.txt"]
    )
    clock.advance(61)
    assert tracker.cleanup() == 1
    assert [p.name for p in out.iterdir()] == ["unrelated.txt"]


def test_sweep_partial_removes_only_old_temporary_files(tmp_path: Path) -> None:
    """Temporary files older than the limit go; fresh ones and results stay."""
    pipeline = ImagePipeline(tmp_path)
    old = tmp_path / ".batchtrack-old.part"
    fresh = tmp_path / ".batchtrack-fresh.part"
    result = tmp_path / "result.jpg"
    for path in (old, fresh, result):
        path.write_bytes(b"x")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    os.utime(result, (time.time() - 7200, time.time() - 7200))
    assert pipeline.sweep_partial(older_than=3600) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([fresh.name, result.name])


def test_remove_results_ignores_ids_that_cannot_name_a_file(tmp_path: Path) -> None:
    """An id like '../x' or '.hidden' never reaches outside the output folder."""
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "x.jpg").write_bytes(b"x")
    (out / ".hidden.jpg").write_bytes(b"x")
    assert ImagePipeline(out).remove_results("b", ["../x", ".hidden", ""]) == 0
    assert (tmp_path / "x.jpg").exists()
    assert (out / ".hidden.jpg").exists()


@pytest.mark.parametrize("as_path", [str, Path])
def test_the_pipeline_called_with_a_path_processes_that_file(
    tmp_path: Path, out: Path, as_path: type
) -> None:
    """ImagePipeline(out)(path) treats the path as an item's source and names the result
    after the file."""
    src = _jpeg_with_exif(tmp_path / "photo.jpg", size=(400, 300))
    written = ImagePipeline(out, max_size=100)(as_path(src))
    assert Path(written) == out / "photo.jpg"
    with Image.open(written) as result:
        assert result.size == (75, 100)  # rotated by its EXIF orientation, then fitted
    assert [p.name for p in out.iterdir()] == ["photo.jpg"]


def test_the_pipeline_called_with_neither_item_nor_path_raises_type_error(out: Path) -> None:
    """Bytes, numbers and bytes paths are refused with a TypeError that says what to pass."""
    pipeline = ImagePipeline(out)
    for bad in (b"\xff\xd8 raw bytes", 42, None):
        with pytest.raises(TypeError, match=r"an Item or a path \(str or os.PathLike\)"):
            pipeline(bad)  # type: ignore[arg-type]
    assert list(out.iterdir()) == []
