"""Image benchmarks: the pipeline vs a naive Pillow loop, tracking overhead, pool kinds."""

from __future__ import annotations

import io
import random
import tempfile
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

from PIL import Image, ImageOps

from batchtrack import BatchTracker, Item, Orchestrator
from batchtrack.imaging import ImagePipeline
from harness import Comparison, compare


def make_jpegs(folder: Path, count: int, size: tuple[int, int] = (1600, 1200)) -> list[Path]:
    """Photo-like JPEGs: gradients with noise, an EXIF orientation on some."""
    rng = random.Random(7)
    paths = []
    for n in range(count):
        base = Image.linear_gradient("L").resize(size).convert("RGB")
        noise = Image.effect_noise(size, 40 + n).convert("RGB")
        image = Image.blend(base, noise, 0.35)
        exif = Image.Exif()
        exif[0x0112] = rng.choice([1, 1, 6, 8])
        path = folder / f"photo{n:03d}.jpg"
        image.save(path, quality=90, exif=exif.tobytes())
        paths.append(path)
    return paths


def naive(path: Path, max_size: int = 512) -> bytes:
    """What most code does: open, exif_transpose, thumbnail, save."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        image.thumbnail((max_size, max_size))
        out = io.BytesIO()
        image.save(out, "JPEG", quality=85)
        return out.getvalue()


def pipeline_vs_naive(paths: list[Path], out: Path) -> Comparison:
    pipeline = ImagePipeline(out, max_size=512)
    items = [Item(p.name, p, id=f"i{n}") for n, p in enumerate(paths)]

    def ours() -> None:
        for item in items:
            pipeline(item)

    def baseline() -> None:
        for path in paths:
            naive(path)

    return compare(
        "ImagePipeline vs naive Pillow loop, 1600x1200 JPEG -> 512 (time)",
        ours,
        baseline,
        goal=1 / 1.5,
        rounds=5,
    )


def orchestrated_vs_bare(paths: list[Path], out: Path, count: int) -> Comparison:
    pipeline = ImagePipeline(out, max_size=512)
    sources = [paths[n % len(paths)] for n in range(count)]

    def ours() -> None:
        with Orchestrator(BatchTracker(), pipeline, concurrency=2) as orch:
            orch.run(sources)

    def baseline() -> None:
        items = [Item(p.name, p, id=f"b{n}") for n, p in enumerate(sources)]
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(pipeline, items))

    return compare(
        f"Orchestrator+tracker vs bare ThreadPoolExecutor.map, {count} images (time)",
        ours,
        baseline,
        goal=1 / 0.99,
        rounds=5,
    )


def process_vs_thread_pool(paths: list[Path], out: Path, count: int) -> Comparison:
    pipeline = ImagePipeline(out, max_size=512)
    sources = [paths[n % len(paths)] for n in range(count)]

    def with_pool(make: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            with (
                make() as pool,  # type: ignore[attr-defined]
                Orchestrator(BatchTracker(), pipeline, concurrency=2, executor=pool) as orch,
            ):
                orch.run(sources)

        return run

    return compare(
        f"process pool vs thread pool (2 workers), {count} images (time; a figure, no goal)",
        with_pool(lambda: ProcessPoolExecutor(2)),
        with_pool(lambda: ThreadPoolExecutor(2)),
        goal=float("inf"),
        rounds=3,
    )


def run(quick: bool = False) -> list[Comparison]:
    count = 40 if quick else 200
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        out = folder / "out"
        out.mkdir()
        paths = make_jpegs(folder, 10 if quick else 20)
        return [
            pipeline_vs_naive(paths, out),
            orchestrated_vs_bare(paths, out, count),
            process_vs_thread_pool(paths, out, count),
        ]
