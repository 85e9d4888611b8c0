"""The ``batchtrack`` command: ``serve``, ``process`` and ``status``.

Exit status: 0 success, 1 when some item failed or was cancelled (``process``) or a batch
is unknown (``status``), 2 for a usage error. Usage errors are one line on stderr, never a
traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import importlib.util
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any, NoReturn

import attrs

from . import __version__
from ._models import BatchSnapshot, Item
from ._paths import DB_NAME
from .exceptions import BatchNotFound, BatchtrackError, ValidationError
from .stores.base import Store

if TYPE_CHECKING:
    from ._orchestrator import Orchestrator
    from ._tracker import BatchTracker
    from .files.base import FileStorage

__all__ = ["main"]

log = logging.getLogger("batchtrack")


class _Usage(Exception):
    """A usage error: printed as one line, exit status 2."""


def _need(module: str, name: str, extra: str) -> None:
    try:
        __import__(module)
    except ImportError:
        from ._extras import missing

        raise _Usage(missing("this command", name, extra)) from None


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


def _trusted_origin(text: str) -> str:
    from ._origins import parse_trusted_origins

    try:
        parse_trusted_origins([text])
    except ValidationError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an origin such as https://app.example.com"
        ) from None
    return text


def _port(text: str) -> int:
    value = _positive(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"a port is at most 65535, got {value}")
    return value


DATA_DIR = Path("batchtrack-data")
"""The data folder of ``serve``, ``status`` and ``process --data-dir`` when none is given."""

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".gif", ".bmp", ".dib", ".tif", ".tiff"}
    | {".heic", ".heif", ".avif"}  # photos people expect to work: they fail with the reason
)
"""In folders, files with these extensions (any case) are images; others are skipped."""

_PROCESS_TTL = 7 * 24 * 3600.0  # `process --data-dir` batches: a week to read them back
_MAX_ID, _MAX_NAME = 255, 1024  # the tracker's limits for item ids and filenames


class _Parser(argparse.ArgumentParser):
    commands: dict[str, argparse.ArgumentParser]  # the parser of each command, by name

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")

    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: None = None
    ) -> argparse.Namespace:
        # An option no command knows is the command's error ("batchtrack serve: error"),
        # not the main parser's, which argparse would report.
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            where = getattr(self, "commands", {}).get(getattr(parsed, "command", None), self)
            where.error(f"unrecognized arguments: {' '.join(unknown)}")
        return parsed


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="batchtrack",
        description="Run batches of images and show their progress.",
        epilog="Exit status: 0 success, 1 some image failed or was cancelled, or the batch "
        "is unknown, "
        "2 a usage error.",
    )
    parser.add_argument("--version", action="version", version=f"batchtrack {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    serve = commands.add_parser(
        "serve",
        help="the demo service: a page to upload images and watch the batch",
        description="The demo service: a page at / to upload images and watch the batch, "
        "the API under /api. Logs each request and each batch's start and end on stderr.",
    )
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)"
    )
    serve.add_argument("--port", type=_port, default=8000, help="port to listen on (default: 8000)")
    _data_dir_option(serve, "database, uploads and results", created=True)
    _store_option(serve)
    serve.add_argument(
        "--files",
        metavar="URL",
        help="where uploads and results live: file:///path or s3://bucket/prefix (endpoint "
        "and credentials from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
        "AWS_REGION) (default: the --data-dir folder)",
    )
    serve.add_argument(
        "--concurrency",
        type=_positive,
        default=4,
        metavar="N",
        help="images processed at once (default: 4)",
    )
    serve.add_argument(
        "--lease",
        type=_seconds,
        default=60.0,
        metavar="SECONDS",
        help="an image whose worker shows no sign of life for this long is run again (default: 60)",
    )
    serve.add_argument(
        "--max-files",
        type=_positive,
        default=10,
        metavar="N",
        help="images per batch, as the page and the API accept them (default: 10)",
    )
    serve.add_argument(
        "--trusted-origin",
        dest="trusted_origins",
        action="append",
        type=_trusted_origin,
        default=[],
        metavar="ORIGIN",
        help="an origin (https://app.example.com) whose pages may upload, start, pause or "
        "cancel batches with a visitor's cookie; repeat for more. Other sites' requests are "
        "refused with 403 (default: only the origin the request was sent to)",
    )
    serve.add_argument(
        "--webhook",
        dest="webhooks",
        action="append",
        default=[],
        metavar="URL",
        help="POST a signed JSON (Standard Webhooks) to URL when a batch ends; repeat for "
        "more. Retried with back-off for up to a day; an answer 410 unsubscribes the URL "
        "(default: none)",
    )
    serve.add_argument(
        "--webhook-secret",
        metavar="whsec_...",
        help="the secret that signs webhooks: whsec_ and the base64 of 24 to 64 random bytes "
        "(default: the environment variable BATCHTRACK_WEBHOOK_SECRET)",
    )
    serve.add_argument(
        "--max-upload-storage",
        type=_size,
        default=2**30,
        metavar="SIZE",
        help="the most the uploads folder holds, e.g. 500M or 2G; more is refused with 507 "
        "(default: 1G)",
    )
    serve.add_argument(
        "--upload-quota",
        type=_size,
        default=200 * 2**20,
        metavar="SIZE",
        help="what one client (IP address) may upload per hour; more is refused with 429 "
        "(default: 200M)",
    )
    serve.add_argument(
        "--metrics",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="answer GET /metrics for Prometheus (default: when prometheus-client is installed)",
    )
    serve.add_argument(
        "--quiet",
        action="store_true",
        help="log only warnings and errors, not each request and batch",
    )
    serve.add_argument(
        "--header-timeout",
        type=_seconds,
        default=10.0,
        metavar="SECONDS",
        help="a client that has not sent a request's headers within this long is answered "
        "408 and disconnected (default: 10)",
    )
    serve.add_argument(
        "--max-connections",
        type=_positive,
        default=None,
        metavar="N",
        help="connections held at once; past it, the oldest one without a request under way "
        "is closed (default: from the open-files limit, which serve raises to its hard limit)",
    )

    cpus = os.cpu_count() or 2
    process = commands.add_parser(
        "process",
        help="process files and folders of images, with a progress bar",
        description="Process files and folders of images into --out, with a progress bar "
        "on stderr. In folders (searched recursively), files with an image extension are "
        f"images ({', '.join(sorted(IMAGE_SUFFIXES))}); other files and hidden ones are "
        "skipped and counted. Files named on the command line are always images.",
    )
    process.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="files or folders")
    process.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="DIR",
        help="where results go, keeping the folders' layout (created when missing)",
    )
    process.add_argument(
        "--concurrency",
        type=_positive,
        default=cpus,
        metavar="N",
        help=f"images processed at once (default: the number of CPUs, {cpus} here)",
    )
    process.add_argument(
        "--max-size",
        type=_positive,
        default=2048,
        metavar="PX",
        help="the longest side of a result, in pixels; never enlarged (default: 2048)",
    )
    process.add_argument(
        "--format",
        type=str.lower,
        choices=["jpeg", "png", "webp"],
        default=None,
        help="the format of the results (default: JPEG, PNG and WebP stay as they are, "
        "other formats become PNG)",
    )
    process.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="keep the batch in DIR's database, for `batchtrack status` (kept 7 days) "
        "(default: in memory only)",
    )
    process.add_argument(
        "--json", action="store_true", help="print only the final status JSON on stdout"
    )

    status = commands.add_parser(
        "status",
        help="print a batch's status JSON",
        description="Print a batch's status JSON (only that, on stdout) from the database "
        "of `serve` or `process --data-dir`, also while the batch is running.",
    )
    status.add_argument("batch_id", metavar="BATCH_ID")
    _data_dir_option(status, "the folder of the database", created=False)
    _store_option(status)
    status.add_argument(
        "--failed",
        action="store_true",
        help="list only the failed images (counts stay those of the whole batch)",
    )
    listing = commands.add_parser(
        "list",
        help="list batches, newest first",
        description="List batches, newest first, from the database of `serve` or "
        "`process --data-dir` (or any store): id, status, images done of the total, when "
        "created, metadata. With more than --limit, the last line (on stderr) gives the "
        "--after of the next page.",
    )
    _data_dir_option(listing, "the folder of the database", created=False)
    _store_option(listing)
    listing.add_argument(
        "--owner", default=None, help="only this owner's batches (default: every batch)"
    )
    listing.add_argument(
        "--status",
        default=None,
        metavar="STATUS",
        help="only batches with this status: pending, processing, completed, failed, "
        "cancelled or paused (default: any)",
    )
    listing.add_argument(
        "--limit", default="20", metavar="N", help="at most N batches, 1 to 1000 (default: 20)"
    )
    listing.add_argument(
        "--after",
        default=None,
        metavar="BATCH_ID",
        help="the batches created before this one (default: from the newest)",
    )
    listing.add_argument(
        "--json",
        action="store_true",
        help='print {"batches": [...], "nextAfter": ...} as GET /api/batches answers',
    )
    parser.commands = {"serve": serve, "process": process, "status": status, "list": listing}
    for name, what in _CONTROLS.items():
        control = commands.add_parser(
            name,
            help=f"{what.help} a batch",
            description=f"{what.help.capitalize()} a batch in the database of `serve` or "
            f"`process --data-dir` (or any store): {what.description}",
        )
        control.add_argument("batch_id", metavar="BATCH_ID")
        _data_dir_option(control, "the folder of the database", created=False)
        _store_option(control)
        parser.commands[name] = control
    return parser


@attrs.frozen
class _Control:
    help: str
    description: str
    done: str  # printed when the call changed the batch
    nothing: str  # printed when it did not


_CONTROLS = {
    "pause": _Control(
        "pause",
        "no image that has not started starts until it is resumed; running ones finish.",
        "paused",
        "not paused: it is already paused or has finished",
    ),
    "unpause": _Control(
        "resume",
        "its waiting images run again (a running `batchtrack serve` picks them up within "
        "a minute; its page's Resume button at once).",
        "resumed",
        "not resumed: it is not paused",
    ),
    "cancel": _Control(
        "cancel",
        "every image that has not started is cancelled; running ones finish.",
        "cancelled: {n} image(s) that had not started",
        "nothing to cancel: no image was waiting",
    ),
}


def _data_dir_option(parser: argparse.ArgumentParser, what: str, *, created: bool) -> None:
    made = "created when missing" if created else "it must exist"
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=DATA_DIR,
        metavar="DIR",
        help=f"{what} (default: ./{DATA_DIR}; {made})",
    )


def _store_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--store",
        metavar="URL",
        default=None,
        help="where the batches live: sqlite:///absolute/path.db, redis://host:6379/0, "
        "postgresql://user:password@host:5432/dbname or memory:// "
        "(default: the database in --data-dir)",
    )


def _open_store(args: argparse.Namespace) -> Store:
    """The store of ``--store``, or the SQLite database in ``--data-dir``; a usage error
    (one line) when it cannot be used."""
    from .stores import SQLiteStore, from_url

    if args.store is None:
        try:
            return SQLiteStore(args.data_dir / DB_NAME)
        except BatchtrackError as exc:
            raise _Usage(f"cannot use --data-dir {str(args.data_dir)!r}: {exc}") from None
    try:
        return from_url(args.store)
    except ImportError as exc:
        raise _Usage(f"--store: {exc}") from None
    except BatchtrackError as exc:
        raise _Usage(f"cannot use --store: {exc}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "process":
            return _process(args)
        if args.command in _CONTROLS:
            return _control(args)
        if args.command == "list":
            return _list(args)
        return _status(args)
    except _Usage as exc:
        print(f"batchtrack {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


# -- status ---------------------------------------------------------------------------------


def _need_database(args: argparse.Namespace) -> None:
    if args.store is None and not (args.data_dir / DB_NAME).is_file():
        hint = " (the default; give --data-dir or --store)" if args.data_dir == DATA_DIR else ""
        raise _Usage(f"no batchtrack database in {str(args.data_dir)!r}{hint}")


def _control(args: argparse.Namespace) -> int:
    """pause, unpause, cancel: one line on stdout; exit 1 for an unknown batch."""
    from . import BatchTracker

    what = _CONTROLS[args.command]
    _need_database(args)
    with _open_store(args) as store:
        tracker = BatchTracker(store)
        try:
            changed = int(getattr(tracker, args.command)(args.batch_id))
        except BatchNotFound:
            print(f"batchtrack {args.command}: batch {args.batch_id} not found", file=sys.stderr)
            return 1
        except BatchtrackError as exc:
            raise _Usage(str(exc)) from None
    said = what.done.format(n=changed) if changed else what.nothing
    print(f"batch {args.batch_id} {said}")
    return 0


def _status(args: argparse.Namespace) -> int:
    from . import BatchTracker, Status

    _need_database(args)
    with _open_store(args) as store:
        tracker = BatchTracker(store)
        try:
            # Only the failed items are read: cheap for a batch of any size.
            snap = tracker.get(args.batch_id, status=Status.FAILED if args.failed else None)
        except BatchNotFound:
            print(f"batchtrack status: batch {args.batch_id} not found", file=sys.stderr)
            return 1
        except BatchtrackError as exc:  # the server went away meanwhile, ...
            raise _Usage(str(exc)) from None
    print(json.dumps(snap.to_dict(), indent=2, ensure_ascii=False))
    return 0


_METADATA_SHOWN = 40  # characters of metadata a row of `list` shows


def _list(args: argparse.Namespace) -> int:
    """list: a table (or the JSON of GET /api/batches) of a page of batches."""
    from . import BatchTracker, Status

    limit = args.limit
    if not (limit.isascii() and limit.isdigit() and 1 <= int(limit) <= 1000):
        raise _Usage(f"--limit must be a whole number from 1 to 1000, not {limit!r}")
    statuses = [s.value for s in Status]
    if args.status is not None and args.status not in statuses:
        raise _Usage(f"--status must be one of {', '.join(statuses)}, not {args.status!r}")
    _need_database(args)
    with _open_store(args) as store:
        tracker = BatchTracker(store)
        try:
            page = tracker.list_batches(
                owner=args.owner, status=args.status, limit=int(args.limit), after=args.after
            )
        except BatchtrackError as exc:
            message = str(exc)
            if message.startswith("after="):  # name the option as typed
                message = "--after " + message.removeprefix("after=")
            raise _Usage(message) from None
    if args.json:
        bodies = []
        for snap in page.batches:
            body = snap.to_dict()
            del body["images"]
            bodies.append(body)
        out = {"batches": bodies, "nextAfter": page.next_after}
        print(json.dumps(out, indent=2, ensure_ascii=False))
        return 0
    if not page.batches:
        print("no batches")
        return 0
    rows = [("BATCH", "STATUS", "DONE", "CREATED (UTC)", "METADATA")]
    for snap in page.batches:
        shown = _text(", ".join(f"{k}={v}" for k, v in snap.metadata.items()))
        if len(shown) > _METADATA_SHOWN:
            shown = shown[: _METADATA_SHOWN - 1] + "…"
        rows.append(
            (
                snap.batch_id,
                snap.status.value,
                f"{snap.progress.finished}/{snap.progress.total}",
                snap.created_at.strftime("%Y-%m-%d %H:%M:%S"),
                shown,
            )
        )
    widths = [max(len(row[n]) for row in rows) for n in range(4)]
    for row in rows:
        print(
            "  ".join([*(c.ljust(w) for c, w in zip(row, widths, strict=False)), row[4]]).rstrip()
        )
    if page.next_after is not None:
        print(f"more: --after {page.next_after}", file=sys.stderr)
    return 0


# -- process --------------------------------------------------------------------------------


@attrs.frozen
class _Source:
    """An image to process: where it is, and its place under ``--out``."""

    path: Path
    relative: PurePath  # its path under the folder given, or its name for a file given


def _collect(paths: Sequence[Path], out: Path) -> tuple[list[_Source], list[Path]]:
    """The images to process, and the files skipped in folders (not images by extension,
    or hidden). Files named are always taken; folders are searched recursively, sorted,
    leaving out ``out`` itself (results of an earlier run are not inputs)."""
    images: list[_Source] = []
    skipped: list[Path] = []
    results = out.resolve()
    for path in paths:
        if path.is_file():
            images.append(_Source(path, PurePath(path.name)))
            continue
        for candidate in sorted(path.rglob("*")):
            resolved = candidate.resolve()
            if resolved == results or results in resolved.parents or not candidate.is_file():
                continue
            relative = candidate.relative_to(path)
            if any(part.startswith(".") for part in relative.parts):
                skipped.append(candidate)
            elif candidate.suffix.lower() in IMAGE_SUFFIXES:
                images.append(_Source(candidate, relative))
            else:
                skipped.append(candidate)
    return images, skipped


_UNSAFE = re.compile(r"[\\\x00-\x1f\x7f]|[\ud800-\udfff]")


def _text(value: str) -> str:
    """A path as text a tracker keeps and a terminal shows: no control characters, and
    bytes that are not UTF-8 (``surrogateescape``) as ``_``."""
    return _UNSAFE.sub("_", value)


def _result_suffix(path: Path, fmt: str | None) -> str:
    """The extension of the result of ``path``: that of ``--format``, else the one its
    format gets as its first bytes tell (JPEG, PNG and WebP stay as they are, the rest
    becomes PNG, as :class:`~batchtrack.imaging.ImagePipeline` does)."""
    if fmt is not None:
        return {"jpeg": ".jpg", "png": ".png", "webp": ".webp"}[fmt]
    try:
        with path.open("rb") as file:
            head = file.read(12)
    except OSError:  # it fails when processed, and writes nothing
        return ".png"
    if head.startswith(b"\xff\xd8\xff"):
        return ".jpg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return ".webp"
    return ".png"


def _plan(sources: Sequence[_Source], suffixes: Sequence[str]) -> list[tuple[str, PurePath]]:
    """Each source's item id and result path under ``--out`` (without the extension),
    given the extension of each source's result.

    A result keeps its source's place and name; when two sources would give one result
    file in one folder (``a.png`` and ``a.jpg`` with ``--format jpeg``, ``A.jpg`` and
    ``a.jpg``, or the same name from two folders given), the first keeps it and the next
    get ``-2``, ``-3``: no result ever overwrites another, and no other is renamed
    (``a.jpg`` and ``a.png`` keep their names when they stay JPEG and PNG). The item id
    is the result path without the extension, with it when that is taken (``a.png``).
    """
    taken: dict[PurePath, set[str]] = {}
    ids: set[str] = set()
    plan = []
    for number, (source, suffix) in enumerate(zip(sources, suffixes, strict=True), 1):
        folder = source.relative.parent
        stem = _text(source.relative.stem).lstrip(".") or "image"
        used = taken.setdefault(folder, set())
        name, n = stem, 1
        while (name + suffix).casefold() in used:
            n += 1
            name = f"{stem}-{n}"
        used.add((name + suffix).casefold())
        result = folder / name
        item_id = _text(result.as_posix())
        if item_id in ids:  # a.jpg and a.png: ids a and a.png
            item_id += suffix
        if len(item_id) > _MAX_ID or item_id in ids:
            # Very deep paths, or folders whose names differ only in unprintable bytes:
            # the id only has to be unique, the result path stays as planned.
            item_id = f"{number}:{item_id[-(_MAX_ID - 12) :]}"
        ids.add(item_id)
        plan.append((item_id, result))
    return plan


def _shown(relative: PurePath) -> str:
    """An item's filename: its path under the folder given, the end of it when long."""
    text = _text(relative.as_posix())
    return text if len(text) <= _MAX_NAME else "…" + text[-(_MAX_NAME - 1) :]


@attrs.define
class _IntoFolders:
    """The processor of ``process``: an :class:`ImagePipeline` per result folder, each
    result named as planned; remembers what it wrote."""

    out: Path
    settings: dict[str, Any]
    results: dict[str, PurePath]  # item id -> result path under out, without extension
    delay: float = 0.0  # for tests only: seconds each image waits (BATCHTRACK_TEST_ITEM_DELAY)
    written: dict[str, Path] = attrs.field(factory=dict)
    _pipelines: dict[PurePath, Any] = attrs.field(factory=dict)

    def __call__(self, item: Item) -> Path:
        from .imaging import ImagePipeline

        if self.delay:
            time.sleep(self.delay)
        item_id = str(item.id)
        result = self.results[item_id]
        pipeline = self._pipelines.get(result.parent)
        if pipeline is None:
            # Made on first use, so a folder whose images all fail is not created.
            pipeline = ImagePipeline(self.out / result.parent, **self.settings)
            self._pipelines[result.parent] = pipeline
        path = Path(pipeline(attrs.evolve(item, id=result.name)))
        self.written[item_id] = path
        return path


GRACE = 5.0
"""Seconds the images being processed get to finish after Ctrl-C, before they are
abandoned (failed as "interrupted", their results not written)."""

_INTERRUPTED = "interrupted"  # the error of images Ctrl-C stopped, as serve gives them


_TICK = 0.1
"""Seconds the main thread blocks at most while a batch runs: a signal may be delivered
to any thread, and Python runs its handler only once the main thread wakes up."""


@attrs.define
class _CtrlC:
    """The SIGINT handler while a batch runs: the first Ctrl-C asks to stop the batch,
    the second exits at once, with status 130."""

    pressed: bool = False

    def __call__(self, signum: int, frame: object) -> None:
        if self.pressed:
            os._exit(130)  # the threads still processing images are not waited for
        self.pressed = True


def _process(args: argparse.Namespace) -> int:
    _need("PIL", "Pillow", "images")
    _need("tqdm", "tqdm", "cli")
    from . import BatchTracker, Orchestrator, SQLiteStore
    from ._test_delay import item_delay
    from .imaging import ImagePipeline
    from .progress import ProgressBar

    missing = [str(p) for p in args.paths if not p.exists()]
    if missing:
        raise _Usage(f"no such file or folder: {', '.join(missing)}")
    odd = [str(p) for p in args.paths if not (p.is_file() or p.is_dir())]
    if odd:
        raise _Usage(f"not a file or a folder: {', '.join(odd)}")
    sources, skipped = _collect(args.paths, args.out)
    if not sources:  # before --out is made: nothing to do creates nothing
        found = f"; skipped {_skipped_text(skipped)}" if skipped else ""
        raise _Usage(f"no images found in the paths given{found}")
    settings = {"max_size": args.max_size, "format": args.format}
    try:
        ImagePipeline(args.out, **settings)  # checks the settings and creates --out
    except ValidationError as exc:
        raise _Usage(
            str(exc).replace("output_dir", "--out").replace("max_size", "--max-size")
        ) from None
    plan = _plan(sources, [_result_suffix(s.path, args.format) for s in sources])
    processor = _IntoFolders(args.out, settings, dict(plan), delay=item_delay())
    items = [
        Item(_shown(s.relative), source=s.path, id=i)
        for s, (i, _) in zip(sources, plan, strict=True)
    ]
    if args.data_dir is None:
        tracker = BatchTracker()
    else:
        try:
            args.data_dir.mkdir(parents=True, exist_ok=True)
            tracker = BatchTracker(SQLiteStore(args.data_dir / DB_NAME), ttl=_PROCESS_TTL)
        except (OSError, BatchtrackError) as exc:
            raise _Usage(f"cannot use --data-dir {str(args.data_dir)!r}: {exc}") from None
    ctrl_c = _CtrlC()
    handled = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, ctrl_c) if handled else None
    bar = ProgressBar(total=len(items), unit="img")
    orch = Orchestrator(tracker, processor, concurrency=args.concurrency)
    try:
        batch_id = orch.submit(items, on_progress=bar).batch_id
        if args.data_dir is not None:
            bar.write(f"batch {batch_id}")
        while not ctrl_c.pressed:
            with contextlib.suppress(TimeoutError):
                orch.wait(batch_id, timeout=_TICK)
                break
        bar.close()  # after Ctrl-C, the images failed now are not drawn
        abandoned = _stop(orch, tracker, batch_id) if ctrl_c.pressed else False
        snap = tracker.get(batch_id)
        _report(snap, sources, skipped, processor, args, interrupted=ctrl_c.pressed)
        if abandoned:
            # Threads still process images: exiting normally would wait for them.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)
    finally:
        bar.close()
        # Nothing runs on once we return (an error above stops the batch, too).
        orch.close(cancel_pending=True, reason=_INTERRUPTED)
        tracker.store.close()
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    if ctrl_c.pressed:
        return 130
    return 0 if snap.progress.failed == 0 and snap.progress.cancelled == 0 else 1


def _stop(orch: Orchestrator, tracker: BatchTracker, batch_id: str) -> bool:
    """After Ctrl-C: fail the images not started as "interrupted" and give the running
    ones :data:`GRACE` seconds; return True when some were abandoned (failed as
    "interrupted", still running)."""
    from . import InvalidTransition, Status

    running = tracker.get(batch_id, items=False).progress.processing
    wait = f"; waiting up to {GRACE:.0f}s for the {running} being processed" if running else ""
    print(f"stopping: no new images{wait} (Ctrl-C again quits now)", file=sys.stderr, flush=True)
    closer = threading.Thread(
        target=orch.close,
        kwargs={"cancel_pending": True, "reason": _INTERRUPTED},
        name="batchtrack-stop",
        daemon=True,
    )
    closer.start()
    deadline = time.monotonic() + GRACE
    while closer.is_alive() and time.monotonic() < deadline:
        closer.join(_TICK)
    if not closer.is_alive():
        return False
    # The abandoned images' workers may still finish: they are not reported.
    logging.getLogger("batchtrack").setLevel(logging.CRITICAL)
    for item in tracker.get(batch_id, status=Status.PROCESSING).items:
        with contextlib.suppress(InvalidTransition):
            tracker.fail_item(batch_id, item.id, _INTERRUPTED)
    return True


def _names(names: Sequence[str], shown: int = 5) -> str:
    """``a.jpg, b.jpg, c.jpg and 4 more``."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _skipped_text(skipped: Sequence[Path], shown: int = 5) -> str:
    """``3 files (no image extension, or hidden): a.txt, b.csv, .DS_Store``."""
    files = "file" if len(skipped) == 1 else "files"
    names = _names([_text(str(p)) for p in skipped], shown)
    return f"{len(skipped)} {files} (no image extension, or hidden): {names}"


def _report(
    snap: BatchSnapshot,
    sources: Sequence[_Source],
    skipped: Sequence[Path],
    processor: _IntoFolders,
    args: argparse.Namespace,
    *,
    interrupted: bool = False,
) -> None:
    if args.json:
        print(json.dumps(snap.to_dict(), ensure_ascii=False), flush=True)
    stopped = [item for item in snap.items if interrupted and item.error == _INTERRUPTED]
    p = snap.progress
    failed = p.failed - len(stopped)
    # Cancelled (by a cancel from elsewhere on the same database): named apart, as the
    # images Ctrl-C stopped are.
    cancelled = f", {p.cancelled} cancelled" if p.cancelled else ""
    print(
        f"{p.completed} of {p.total} images processed, {failed} failed{cancelled}",
        file=sys.stderr,
    )
    if stopped:
        images = "image" if len(stopped) == 1 else "images"
        names = _names([item.filename for item in stopped])
        print(f"interrupted: {len(stopped)} {images} not processed: {names}", file=sys.stderr)
    if skipped:
        print(f"Skipped {_skipped_text(skipped)}", file=sys.stderr)
    by_id = {item.id: source for item, source in zip(snap.items, sources, strict=True)}
    renamed = [
        (by_id[item_id], path)
        for item_id, path in sorted(processor.written.items(), key=lambda kv: str(kv[1]))
        if path.stem != by_id[item_id].path.stem
    ]
    if renamed:
        print("Renamed, so that no result overwrites another:", file=sys.stderr)
        for source, path in renamed:
            print(f"  {_text(str(source.path))} -> {_text(str(path))}", file=sys.stderr)
    stopped_ids = {item.id for item in stopped}
    failures = [
        (by_id[item.id], item) for item in snap.items if item.error and item.id not in stopped_ids
    ]
    if failures:
        width = min(max(len(_text(str(s.path))) for s, _ in failures), 60)
        print(f"\n{'file':<{width}}  error", file=sys.stderr)
        for source, item in failures:
            print(f"{_text(str(source.path)):<{width}}  {item.error}", file=sys.stderr)
    if args.data_dir is not None:
        where = "" if args.data_dir == DATA_DIR else f" --data-dir {args.data_dir}"
        print(f"\nbatch {snap.batch_id}: batchtrack status {snap.batch_id}{where}", file=sys.stderr)
    sys.stderr.flush()


# -- serve ----------------------------------------------------------------------------------


def _listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` the way uvicorn binds one; a usage error when the
    port is taken or the address is not this machine's, before anything is started."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        reason = exc.strerror or str(exc)
        if exc.errno == errno.EADDRINUSE:
            reason = "the port is in use (another server?); choose another --port"
        raise _Usage(f"cannot listen on {host}:{port}: {reason}") from None
    sock.set_inheritable(True)
    return sock


def _files(url: str | None) -> FileStorage | None:
    """The file storage ``--files`` names, checked now: one clear line when it is unusable."""
    if url is None:
        return None
    from .files import from_url

    try:
        return from_url(url)
    except ImportError as exc:
        raise _Usage(f"--files {url}: {exc}") from None
    except BatchtrackError as exc:
        raise _Usage(f"cannot use --files {url}: {exc}") from None


def _webhooks(urls: list[str], secret: str | None) -> list[Any]:
    """The webhooks of ``serve --webhook URL --webhook-secret whsec_...``.

    Raises:
        _Usage: A URL or secret that cannot be used, or one without the other.
    """
    from .webhooks import Webhook

    secret = secret or os.environ.get("BATCHTRACK_WEBHOOK_SECRET") or None
    if not urls:
        if secret is not None and "BATCHTRACK_WEBHOOK_SECRET" not in os.environ:
            raise _Usage("--webhook-secret needs at least one --webhook URL")
        return []
    if secret is None:
        raise _Usage(
            "--webhook needs a secret: --webhook-secret whsec_... or BATCHTRACK_WEBHOOK_SECRET"
        )
    hooks = []
    for url in urls:
        try:
            hooks.append(Webhook(url, secret))
        except ValidationError as exc:
            raise _Usage(f"--webhook {url}: {exc}") from None
    return hooks


def _serve(args: argparse.Namespace) -> int:
    _need("uvicorn", "uvicorn", "server")
    _need("python_multipart", "python-multipart", "server")
    _need("PIL", "Pillow", "images")
    import uvicorn

    from . import BatchTracker
    from ._access_log import AccessLog, BatchWatch
    from ._demo import build
    from ._serve_limits import bounded_protocol, connection_cap, raise_fd_limit, settle_malloc
    from .stores import _shown

    logging.getLogger("batchtrack").setLevel(logging.WARNING if args.quiet else logging.INFO)
    secret = os.environ.get("BATCHTRACK_SECRET") or None
    if secret is not None and len(secret) < 16:
        raise _Usage("BATCHTRACK_SECRET must be at least 16 characters (a long random string)")
    files = _files(args.files)
    webhooks = _webhooks(args.webhooks, args.webhook_secret)
    if args.metrics:
        _need("prometheus_client", "prometheus-client", "metrics")
    elif args.metrics is None:
        args.metrics = importlib.util.find_spec("prometheus_client") is not None
    # Connections are capped below the open-files limit: accept never runs out of fds.
    max_connections = args.max_connections or connection_cap(raise_fd_limit())
    settle_malloc()  # before the threads start: RSS levels off instead of creeping up
    sock = _listen(args.host, args.port)
    try:
        # The store is opened first: a URL that cannot be used stops here, with nothing made.
        tracked = _open_store(args) if args.store is not None else None
        try:
            app, close = build(
                args.data_dir,
                store=tracked,
                concurrency=args.concurrency,
                lease=args.lease,
                max_files=args.max_files,
                max_upload_storage=args.max_upload_storage,
                upload_quota=args.upload_quota,
                files=files,
                session_secret=secret,
                trusted_origins=args.trusted_origins,
                metrics=args.metrics,
                webhooks=webhooks,
            )
        except (OSError, BatchtrackError) as exc:
            if tracked is not None:
                tracked.close()
            raise _Usage(f"cannot use --data-dir {str(args.data_dir)!r}: {exc}") from None
        # The log reads the batches through a store of its own on the same database.
        store = _open_store(args)
        watch = BatchWatch(functools.partial(BatchTracker(store).get, items=False))
        host = f"[{args.host}]" if ":" in args.host else args.host
        where = f"data in {args.data_dir.resolve()}"
        if args.store is not None:
            where = f"batches in {_shown(args.store)}"
            if files is None:
                where += f", files in {args.data_dir.resolve()}"
        if files is not None:
            where += f", files in {files.url}"
        print(
            f"batchtrack serving on http://{host}:{args.port}/ ({where}); Ctrl-C stops",
            file=sys.stderr,
            flush=True,
        )
        try:
            config = uvicorn.Config(
                AccessLog(app, watch),
                host=args.host,
                port=args.port,
                log_level="warning",
                access_log=False,
                lifespan="on",
                http=bounded_protocol(args.header_timeout, max_connections),
                ws="none",  # the app answers no WebSocket: upgrades are plain requests
            )
            server = uvicorn.Server(config)
            # uvicorn shuts down gracefully on Ctrl-C, then re-raises the signal: we are done.
            with contextlib.suppress(KeyboardInterrupt):
                server.run(sockets=[sock])
        finally:
            watch.close()
            close()
            watch.check()  # batches that ended while shutting down
            store.close()
    finally:
        sock.close()
    return 0


def _entry() -> Any:  # pragma: no cover - the console script
    sys.exit(main())
