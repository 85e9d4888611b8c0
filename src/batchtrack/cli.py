"""The ``batchtrack`` command: ``serve``, ``process`` and ``status``.

Exit status: 0 success, 1 when some item failed (``process``) or a batch is unknown
(``status``), 2 for a usage error. Usage errors are one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from . import __version__
from ._models import BatchSnapshot, ProgressEvent
from ._paths import DB_NAME
from .exceptions import BatchNotFound, BatchtrackError

__all__ = ["main"]

log = logging.getLogger("batchtrack")


class _Usage(Exception):
    """A usage error: printed as one line, exit status 2."""


def _need(module: str, extra: str) -> None:
    try:
        __import__(module)
    except ImportError:
        raise _Usage(f"this command needs {module}: pip install 'batchtrack[{extra}]'") from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text}")
    return value


_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?", re.IGNORECASE)
_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def _size(text: str) -> int:
    """A size in bytes: ``1048576``, or with a binary suffix, ``500K``, ``500M``, ``2G``,
    ``1.5T`` (``M``, ``MB`` and ``MiB`` alike mean 2**20 bytes)."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(
            f"expected a size in bytes such as 1048576, 500M or 2G, got {text!r}"
        )
    number, unit = match[1], _UNITS[match[2].lower()]
    value = int(number) * unit if number.isdigit() else int(float(number) * unit)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a size of at least 1 byte, got {text!r}")
    return value


def _port(text: str) -> int:
    value = _positive(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"a port is at most 65535, got {value}")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="batchtrack",
        description="Run batches of images and show their progress.",
    )
    parser.add_argument("--version", action="version", version=f"batchtrack {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    serve = commands.add_parser(
        "serve", help="the demo service: a page to upload images and watch the batch"
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    serve.add_argument("--port", type=_port, default=8000, help="port to listen on (8000)")
    serve.add_argument(
        "--data-dir",
        type=Path,
        default=Path("batchtrack-data"),
        help="database, uploads and results (./batchtrack-data; created when missing)",
    )
    serve.add_argument("--concurrency", type=_positive, default=4, help="images at once (4)")
    serve.add_argument(
        "--lease",
        type=_seconds,
        default=60.0,
        metavar="SECONDS",
        help="an image whose worker shows no sign of life for this long is run again (60)",
    )
    serve.add_argument(
        "--max-upload-storage",
        type=_size,
        default=2**30,
        metavar="SIZE",
        help="the most the uploads folder holds, e.g. 500M or 2G; more is refused with 507 (1G)",
    )
    serve.add_argument(
        "--upload-quota",
        type=_size,
        default=200 * 2**20,
        metavar="SIZE",
        help="what one client (IP address) may upload per hour; more is refused with 429 (200M)",
    )

    process = commands.add_parser(
        "process", help="process files and folders of images, with a progress bar"
    )
    process.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="files or folders")
    process.add_argument("--out", type=Path, required=True, help="where results go (created)")
    process.add_argument("--concurrency", type=_positive, default=os.cpu_count() or 2)
    process.add_argument("--max-size", type=_positive, default=2048, metavar="PX")
    process.add_argument("--format", choices=["JPEG", "PNG", "WEBP", "jpeg", "png", "webp"])
    process.add_argument(
        "--json", action="store_true", help="print only the final status JSON on stdout"
    )

    status = commands.add_parser("status", help="print a batch's status JSON")
    status.add_argument("batch_id", metavar="BATCH_ID")
    status.add_argument("--data-dir", type=Path, required=True, help="the serve data folder")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "process":
            return _process(args)
        return _status(args)
    except _Usage as exc:
        print(f"batchtrack {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


# -- status ---------------------------------------------------------------------------------


def _status(args: argparse.Namespace) -> int:
    from . import BatchTracker, SQLiteStore

    db = args.data_dir / DB_NAME
    if not db.is_file():
        raise _Usage(f"no batchtrack database in {str(args.data_dir)!r}")
    try:
        store = SQLiteStore(db)
    except BatchtrackError as exc:
        raise _Usage(str(exc)) from None
    with store:
        try:
            snap = BatchTracker(store).get(args.batch_id)
        except BatchNotFound:
            print(f"batchtrack status: batch {args.batch_id} not found", file=sys.stderr)
            return 1
    print(json.dumps(snap.to_dict(), indent=2, ensure_ascii=False))
    return 0


# -- process --------------------------------------------------------------------------------


def _images(paths: Sequence[Path]) -> Iterator[Path]:
    """Files as given; the images (by content) found in folders, recursively, sorted."""
    from PIL import Image, UnidentifiedImageError

    for path in paths:
        if path.is_file():
            yield path
            continue
        for candidate in sorted(p for p in path.rglob("*") if p.is_file()):
            try:
                with Image.open(candidate):
                    pass
            except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
                continue
            yield candidate


def _process(args: argparse.Namespace) -> int:
    _need("PIL", "images")
    _need("tqdm", "cli")
    from tqdm import tqdm

    from . import BatchTracker, Item, Orchestrator
    from .imaging import ImagePipeline

    missing = [str(p) for p in args.paths if not p.exists()]
    if missing:
        raise _Usage(f"no such file or folder: {', '.join(missing)}")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _Usage(f"cannot create --out {str(args.out)!r}: {exc.strerror}") from None
    paths = list(_images(args.paths))
    if not paths:
        raise _Usage("no images found in the paths given")
    pipeline = ImagePipeline(args.out, max_size=args.max_size, format=args.format)
    bar = tqdm(
        total=len(paths),
        unit="img",
        file=sys.stderr,
        dynamic_ncols=True,
        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}, {rate_fmt}{postfix}]",
        disable=None,  # drawn on a terminal, silent when stderr is not one
    )

    def on_progress(event: ProgressEvent) -> None:
        if not event.item.status.is_final:
            return
        p = event.progress
        eta = event.estimated_time_remaining
        bar.set_postfix_str(
            f"{p.completed} ok, {p.failed} failed" + ("" if eta is None else f", ETA {eta}s"),
            refresh=False,
        )
        bar.update(1)

    items = [
        Item(path.name, source=path, id=i) for path, i in zip(paths, _names(paths), strict=True)
    ]
    with Orchestrator(BatchTracker(), pipeline, concurrency=args.concurrency) as orch:
        try:
            snap = orch.run(items, on_progress=on_progress)
        finally:
            bar.close()
    _report(snap, paths, as_json=args.json)
    return 0 if snap.progress.failed == 0 else 1


def _names(paths: Sequence[Path]) -> list[str]:
    """Output names for the results: the files' stems, made unique and safe."""
    seen: set[str] = set()
    names = []
    for path in paths:
        stem = re.sub(r"[^\w.-]+", "_", path.stem).lstrip(".") or "image"
        name, n = stem, 1
        while name in seen:
            n += 1
            name = f"{stem}-{n}"
        seen.add(name)
        names.append(name)
    return names


def _report(snap: BatchSnapshot, paths: Sequence[Path], *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(snap.to_dict(), ensure_ascii=False))
    p = snap.progress
    print(f"{p.completed} of {p.total} images processed, {p.failed} failed", file=sys.stderr)
    failures = [(path, item) for path, item in zip(paths, snap.items, strict=True) if item.error]
    if failures:
        width = min(max(len(str(path)) for path, _ in failures), 60)
        print(f"\n{'file':<{width}}  error", file=sys.stderr)
        for path, item in failures:
            print(f"{path!s:<{width}}  {item.error}", file=sys.stderr)


# -- serve ----------------------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    _need("uvicorn", "server")
    _need("python_multipart", "server")
    _need("PIL", "images")
    import uvicorn

    from ._demo import build

    try:
        app, close = build(
            args.data_dir,
            concurrency=args.concurrency,
            lease=args.lease,
            max_upload_storage=args.max_upload_storage,
            upload_quota=args.upload_quota,
        )
    except (OSError, BatchtrackError) as exc:
        raise _Usage(f"cannot use --data-dir {str(args.data_dir)!r}: {exc}") from None
    url = f"http://{args.host}:{args.port}/"
    print(
        f"batchtrack serving on {url} (data in {args.data_dir.resolve()}); Ctrl-C stops",
        file=sys.stderr,
        flush=True,
    )
    try:
        config = uvicorn.Config(
            app, host=args.host, port=args.port, log_level="warning", lifespan="on"
        )
        server = uvicorn.Server(config)
        # uvicorn shuts down gracefully on Ctrl-C, then re-raises the signal: we are done.
        with contextlib.suppress(KeyboardInterrupt):
            server.run()
        if not server.started:
            raise _Usage(f"could not listen on {args.host}:{args.port} (in use?)")
    finally:
        close()
    return 0


def _entry() -> Any:  # pragma: no cover - the console script
    sys.exit(main())
