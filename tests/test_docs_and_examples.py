"""The documentation builds without warnings, its examples run, and so do the examples."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.parametrize("builder", ["html", "doctest"])
def test_docs_build_without_warnings(builder: str, tmp_path: Path) -> None:
    """sphinx-build -W succeeds for the HTML pages and for every doctest in them."""
    pytest.importorskip("sphinx")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",
            "--keep-going",
            "-q",
            "-b",
            builder,
            str(ROOT / "docs"),
            str(tmp_path / builder),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _sphinx_doctest(pages: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Run the doctest builder with the project's conf.py over these pages."""
    source = tmp_path / "src"
    source.mkdir()
    toctree = "\n".join(f"   {name}" for name in pages)
    (source / "index.rst").write_text(f"Pages\n=====\n\n.. toctree::\n\n{toctree}\n")
    for name, body in pages.items():
        (source / f"{name}.rst").write_text(f"{name}\n{'=' * len(name)}\n\n{body}")
    run_in = tmp_path / "cwd"
    run_in.mkdir()
    sphinx = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "doctest"]
    return subprocess.run(
        [*sphinx, "-c", str(ROOT / "docs"), str(source), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        check=False,
        cwd=run_in,
    )


@pytest.mark.slow
def test_doctests_run_each_page_alone_in_an_empty_folder(tmp_path: Path) -> None:
    """With docs/conf.py a snippet fails that uses a name its page does not import, a
    name from another page, or a folder it did not make; files snippets write land in a
    temporary folder, never where the docs are built from."""
    pytest.importorskip("sphinx")
    pages = {
        "imports": (
            ".. doctest::\n\n"
            "    >>> from batchtrack.testing import FakeClock\n"
            "    >>> FakeClock(5.0)()\n    5.0\n"
            "    >>> from_this_page = 1\n"
            "    >>> import os\n"
            "    >>> os.mkdir('made')\n"
            "    >>> _ = open('made/written.txt', 'w').write('x')\n"
            "    >>> sorted(os.listdir('.'))\n    ['made']\n"
        ),
        "noimport": ".. doctest::\n\n    >>> FakeClock()\n    FakeClock(...)\n",
        "nostar": ".. doctest::\n\n    >>> BatchTracker()\n    BatchTracker(...)\n",
        "otherpage": ".. doctest::\n\n    >>> from_this_page\n    1\n",
        "nofolder": (
            ".. testcode::\n\n"
            "    from batchtrack import SQLiteStore\n"
            "    open('data/batches.txt', 'w')\n"
        ),
    }
    result = _sphinx_doctest(pages, tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    failed = set(re.findall(r'File "(\w+)\.rst", line \d+, in default', output))
    assert failed == {"noimport", "nostar", "otherpage", "nofolder"}, output
    assert "NameError: name 'FakeClock' is not defined" in output
    assert "NameError: name 'from_this_page' is not defined" in output
    assert "No such file or directory: 'data/batches.txt'" in output
    leftovers = [p for p in tmp_path.rglob("*") if p.name in ("made", "written.txt")]
    assert leftovers == []
    assert not (ROOT / "docs" / "made").exists()
    assert not (ROOT / "made").exists()


def test_no_page_tells_users_to_pip_install_from_pypi() -> None:
    """No release on PyPI yet: only the Install section may mention `pip install batchtrack`,
    to say that it finds nothing; every other page installs from a clone or a wheel."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.rst"))]
    wrong = []
    for page in pages:
        for number, line in enumerate(page.read_text().splitlines(), 1):
            if re.search(r"pip install\s+\S*batchtrack", line):
                wrong.append(f"{page.name}:{number}: {line.strip()}")
    quickstart = [w for w in wrong if w.startswith("quickstart.rst:")]
    assert [w for w in wrong if w not in quickstart] == []
    install = (ROOT / "docs" / "quickstart.rst").read_text()
    assert "pip install -e '.[all]'" in install
    assert "python -m build" in install
    assert 'pip install "$(ls dist/batchtrack-*.whl)[all]"' in install
    assert all("no release on PyPI" in install or "it will be" in w for w in quickstart)


def test_deployment_points_to_the_tested_celery_module() -> None:
    """deployment.rst's Celery sketch names what docs/examples/celery_app.py (run by
    tests/test_celery.py) defines, and sends readers to the page that includes it."""
    deployment = (ROOT / "docs" / "deployment.rst").read_text()
    example = (ROOT / "docs" / "examples" / "celery_app.py").read_text()
    assert ":doc:`celery`" in deployment
    celery = (ROOT / "docs" / "celery.rst").read_text()
    assert ".. literalinclude:: examples/celery_app.py" in celery
    for line in ("runner = CeleryRunner(tracker, process_image)", "celery -A celery_app worker"):
        assert line in deployment
        assert line in example


@pytest.mark.slow
def test_nox_docs_session_builds_from_a_fresh_virtualenv(tmp_path: Path) -> None:
    """`nox -s docs`, as the README says, installs the docs extra into a new virtualenv and
    builds the HTML and the doctests there: the extra holds all that autodoc imports."""
    nox = shutil.which("nox") or str(Path(sys.executable).with_name("nox"))
    if not Path(nox).exists():
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("CI needs nox (the test extra installs it)")
        pytest.skip("nox is not installed (pip install -e '.[test]')")
    result = subprocess.run(
        [nox, "-s", "docs", "--envdir", str(tmp_path / "env"), "--", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    assert (tmp_path / "out" / "html" / "index.html").is_file()
    assert "0 failures in tests" in (tmp_path / "out" / "doctest" / "output.txt").read_text()


def test_progress_example_runs_to_the_end() -> None:
    """examples/progress.py runs a batch to completion and prints its progress and ETA."""
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "progress.py"),
            "--items",
            "8",
            "--seconds",
            "0.05",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    lines = result.stdout.splitlines()
    assert lines[0].startswith("batch ")
    assert lines[0].endswith(": 8 images")
    assert any(line.startswith("completed") or line.startswith("failed") for line in lines)
    assert "8/8 done" in result.stdout
    assert lines[-1].startswith("finished: ")
    assert lines[-1].endswith("Z")


def test_progress_example_rejects_bad_arguments() -> None:
    """A bad argument gives a usage error (exit 2), not a traceback."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "progress.py"), "--items", "0"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


BENCHMARKS = ROOT / "benchmarks" / "run.py"


def test_benchmarks_run_py_gives_help_and_runs_a_quick_suite() -> None:
    """`python benchmarks/run.py --help` and `--quick core` run as the benchmarks page says."""
    helped = subprocess.run(
        [sys.executable, str(BENCHMARKS), "--help"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert helped.returncode == 0, helped.stderr
    assert "--quick" in helped.stdout
    ran = subprocess.run(
        [sys.executable, str(BENCHMARKS), "--quick", "core"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "## core" in ran.stdout
    assert " ratio " in ran.stdout
    assert ran.stderr == ""


def test_benchmarks_skip_a_suite_with_a_note_when_its_server_program_is_missing() -> None:
    """Without redis-server on the PATH the redis suite is skipped with one line naming it."""
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS), "--quick", "redis"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "redis: SKIPPED: needs redis-server, which is not installed" in result.stdout
    assert "Traceback" not in result.stderr


def test_benchmarks_skip_a_suite_with_a_note_when_pytest_is_missing() -> None:
    """Suites that start servers with the tests' helpers need pytest: without it they are
    skipped with a line saying what to install, not a ModuleNotFoundError."""
    code = (
        "import runpy, sys; sys.modules['pytest'] = None; "
        f"sys.argv = ['run.py', '--quick', 'postgres']; runpy.run_path({str(BENCHMARKS)!r}, "
        "run_name='__main__')"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "postgres: SKIPPED: needs pytest (pip install -e '.[test]'" in result.stdout
    assert "Traceback" not in result.stderr


def test_index_says_which_page_each_kind_of_user_needs() -> None:
    """The index opens with a table sending FastAPI, Flask, Django, Celery, script and
    several-machine users to their pages, before the table of contents."""
    index = (ROOT / "docs" / "index.rst").read_text()
    section = index.split("Which page do I need?", 1)[1].split(".. toctree::", 1)[0]
    for who in ("FastAPI", "Flask", "Django", "Celery", "a plain script", "several machines"):
        assert f"   * - {who}" in section, who
    assert ":ref:`mounting`" in section
    assert ".. _mounting:" in (ROOT / "docs" / "http.rst").read_text()


def test_docs_use_the_furo_theme_and_keep_wide_tables_in_the_column() -> None:
    """conf.py picks furo, the docs extra installs it, and the stylesheet that makes wide
    tables scroll and wrap inside the text column is shipped with the pages."""
    conf = (ROOT / "docs" / "conf.py").read_text()
    assert 'html_theme = "furo"' in conf
    assert 'html_css_files = ["batchtrack.css"]' in conf
    css = (ROOT / "docs" / "_static" / "batchtrack.css").read_text()
    assert "overflow-x: auto" in css
    assert "white-space: normal" in css
    pyproject = (ROOT / "pyproject.toml").read_text()
    docs_extra = re.search(r"^docs = \[(.*)\]$", pyproject, re.MULTILINE)
    assert docs_extra is not None
    assert '"furo' in docs_extra.group(1)


@pytest.mark.slow
def test_dask_page_first_example_runs_on_a_local_cluster(tmp_path: Path) -> None:
    """docs/examples/dask_start.py, run as the Dask page says, processes two images on
    the worker processes of its LocalCluster and prints the batch's counts."""
    pytest.importorskip("distributed")
    image = pytest.importorskip("PIL.Image")
    shutil.copy(ROOT / "docs" / "examples" / "dask_start.py", tmp_path)
    (tmp_path / "photos").mkdir()
    image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "photos" / "a.jpg")
    image.new("RGB", (30, 40), (30, 200, 30)).save(tmp_path / "photos" / "b.png")
    assert (
        "python dask_start.py photos/a.jpg photos/b.png" in (ROOT / "docs" / "dask.rst").read_text()
    )
    result = subprocess.run(
        [sys.executable, "dask_start.py", "photos/a.jpg", "photos/b.png"],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1] == (
        "Progress(total=2, completed=2, failed=0, processing=0, pending=0, cancelled=0)"
    )
    assert len(list((tmp_path / "results").iterdir())) == 2


@pytest.mark.slow
def test_conformance_example_passes_as_the_testing_page_runs_it(tmp_path: Path) -> None:
    """docs/examples/test_my_store.py, saved alone in a folder and run with the testing
    page's command, passes the whole suite: its factory makes a fresh store per call."""
    pytest.importorskip("hypothesis")
    page = (ROOT / "docs" / "testing.rst").read_text()
    assert ".. literalinclude:: examples/test_my_store.py" in page
    assert "``python -m pytest test_my_store.py``" in page
    shutil.copy(ROOT / "docs" / "examples" / "test_my_store.py", tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "test_my_store.py", "-q", "-p", "no:cacheprovider"],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert re.search(r"^\d+ passed in ", summary), summary


def test_deployment_and_http_pages_say_when_uploads_are_cleaned_as_serve_does() -> None:
    """Both pages say what the code does: the next upload deletes expired uploads, and
    `batchtrack serve` runs UploadStore.cleanup() every 10 minutes and at shutdown."""
    demo = (ROOT / "src" / "batchtrack" / "_demo.py").read_text()
    assert "every(600, uploads.cleanup," in demo
    closing = demo.split("def close() -> None:", 1)[1]
    assert "uploads.cleanup()" in closing
    uploads = (ROOT / "src" / "batchtrack" / "uploads.py").read_text()
    begin = uploads.split("def begin(", 1)[1].split("\n    def ", 1)[0]
    assert "self._expire()" in begin
    deployment = " ".join((ROOT / "docs" / "deployment.rst").read_text().split())
    http = " ".join((ROOT / "docs" / "http.rst").read_text().split())
    assert "serve`` does at shutdown" not in deployment
    assert "``batchtrack serve`` does every 10 minutes, and once more at shutdown" in deployment
    assert "(``serve``: every 10 minutes and at shutdown)" in deployment
    assert "deleted when the next upload begins" in deployment
    assert "(``batchtrack serve`` does, every 10 minutes and at shutdown)" in http
    assert "the store deletes them when the next upload begins" in http


# -- every Python snippet of the docs runs somewhere --------------------------------------

DOCS = ROOT / "docs"
TESTS = ROOT / "tests"
PYTHON = ("python", "python3", "py", "pycon")


@attrs.frozen
class Block:
    """A block of a docs page: where it starts, its directive, options and text."""

    where: str
    directive: str
    options: dict[str, str]
    text: str


def _blocks(page: Path) -> Iterator[Block]:
    """The directives (``.. name:: argument``) and ``::`` literal blocks of an rst page."""
    lines = page.read_text().splitlines()
    for number, line in enumerate(lines):
        directive = re.match(r"^(\s*)\.\. ([\w:-]+)::\s*(.*)$", line)
        literal = not directive and line.rstrip().endswith("::") and line.strip() != ""
        if not (directive or literal):
            continue
        indent = len(line) - len(line.lstrip())
        options: dict[str, str] = {}
        body: list[str] = []
        rest = iter(lines[number + 1 :])
        for following in rest:
            option = re.match(r"^\s+:([\w-]+):\s*(.*)$", following)
            if directive and option and not body:
                options[option.group(1)] = option.group(2)
                continue
            if following.strip() and len(following) - len(following.lstrip()) <= indent:
                break
            body.append(following)
        kind = f"{directive.group(2)} {directive.group(3)}".strip() if directive else "::"
        text = textwrap.dedent("\n".join(body)).strip("\n")
        yield Block(f"{page.name}:{number + 1}", kind, options, text)


def _is_python(text: str) -> bool:
    try:
        ast.parse(text)
    except SyntaxError:
        return False
    return True


def _tests_text() -> str:
    return "\n".join(path.read_text() for path in sorted(TESTS.glob("*.py")))


def _untested_snippets(docs: Path) -> list[str]:
    """Every Python snippet of the pages in ``docs`` that nothing runs, with its place."""
    tests = _tests_text()
    wrong = []
    for page in sorted(docs.glob("*.rst")):
        for block in _blocks(page):
            language = block.directive.split(" ", 1)[-1]
            if block.directive == "::":
                if _is_python(block.text):
                    wrong.append(f"{block.where}: Python in a `::` block")
            elif block.directive.startswith("code-block ") and language in PYTHON:
                name = block.options.get("name", "")
                caption = block.options.get("caption", "")
                if caption.startswith("Fragment: ") and len(caption) > len("Fragment: "):
                    continue
                if name.startswith("tested-") and f'"{name}"' in tests:
                    continue
                wrong.append(f"{block.where}: code-block:: python that nothing runs")
            elif block.directive.startswith("literalinclude ") and language.endswith(".py"):
                stem = Path(language).stem
                if not re.search(rf"\b{re.escape(stem)}\b", tests):
                    wrong.append(f"{block.where}: {language} is named by no test")
    return wrong


def test_every_python_snippet_in_the_docs_is_run_or_marked_as_a_fragment() -> None:
    """Python on a page is a doctest/testcode block (run by the docs build), an included
    example that a test names, a code-block whose ``:name: tested-...`` a test runs, or a
    code-block captioned "Fragment: why it cannot run"; never an untested ``::`` block."""
    assert _untested_snippets(DOCS) == []


def test_snippet_checker_flags_untested_python_and_accepts_marked_blocks(tmp_path: Path) -> None:
    """The check above sees an untested code-block and a Python ``::`` block, and lets
    shell ``::`` blocks, fragments with a reason and testcode through."""
    page = tmp_path / "page.rst"
    page.write_text(
        "Title\n=====\n\nRun::\n\n    python benchmarks/run.py --quick\n\n"
        "Code::\n\n    tracker = BatchTracker()\n\n"
        ".. code-block:: python\n\n    import batchtrack\n\n"
        ".. code-block:: python\n    :caption: Fragment: needs a cloud account\n\n    x = 1\n\n"
        ".. code-block:: python\n    :caption: Fragment: \n\n    y = 1\n\n"
        ".. testcode::\n\n    z = 1\n"
    )
    blocks = list(_blocks(page))
    found = {(b.where, b.directive, b.options.get("caption")) for b in blocks}
    assert ("page.rst:4", "::", None) in found
    assert ("page.rst:16", "code-block python", "Fragment: needs a cloud account") in found
    message = "\n".join(_untested_snippets(tmp_path))
    assert "page.rst:8: Python in a `::` block" in message
    assert "page.rst:12: code-block:: python that nothing runs" in message
    assert "page.rst:21: code-block:: python that nothing runs" in message
    assert "page.rst:4:" not in message
    assert "page.rst:16:" not in message
    assert "page.rst:26:" not in message


def _snippet(page: str, name: str) -> str:
    """The text of the code-block ``:name: name`` on ``docs/page``."""
    for block in _blocks(DOCS / page):
        if block.options.get("name") == name:
            return block.text
    raise AssertionError(f"no code-block named {name} in {page}")


def test_redis_store_snippet_runs_against_a_real_redis(redis_url: str) -> None:
    """stores.rst's RedisStore example, pointed at the test server, tracks a batch."""
    code = _snippet("stores.rst", "tested-redis-store")
    assert "redis://redis.internal:6379/0" in code
    namespace: dict[str, Any] = {}
    exec(code.replace("redis://redis.internal:6379/0", redis_url), namespace)
    tracker = namespace["tracker"]
    try:
        batch = tracker.create_batch(["a.jpg"])
        assert tracker.get(batch.batch_id).progress.total == 1
        assert tracker.delete(batch.batch_id)
    finally:
        tracker.store.close()


def test_postgres_store_snippets_run_against_a_real_postgresql(postgres_url: str) -> None:
    """stores.rst's PostgresStore examples (a DSN, then the application's own pool) and its
    listen example, pointed at the test server, run as written one after the other."""
    pytest.importorskip("psycopg_pool")
    from conftest import drop_postgres_tables

    made = _snippet("stores.rst", "tested-postgres-store")
    for dsn in ("postgresql://app:secret@db.internal/app", "postgresql://app@db.internal/app"):
        assert dsn in made
        made = made.replace(dsn, postgres_url)
    namespace: dict[str, Any] = {}
    exec(made, namespace)
    try:
        tracker = namespace["tracker"]
        batch = tracker.create_batch(["a.jpg"])
        assert tracker.get(batch.batch_id).progress.total == 1
        exec(_snippet("stores.rst", "tested-postgres-listen"), namespace)
        assert not namespace["listener"].is_alive()
    finally:
        namespace["tracker"].store.close()
        namespace["pool"].close()
        drop_postgres_tables(postgres_url, "uploads_%")


def test_s3_files_snippet_runs_against_a_real_s3_server(s3_bucket: Any) -> None:
    """files.rst's S3Files example, on a fresh bucket of the test S3 server, writes the
    upload in chunks and reads its first bytes back."""
    code = _snippet("files.rst", "tested-s3-files")
    assert 'S3Files("my-bucket", "batchtrack")' in code
    namespace: dict[str, Any] = {}
    exec(code.replace('"my-bucket"', repr(s3_bucket.name)), namespace)
    try:
        assert namespace["header"] == b"\xff\xd8\xff\xe0...the rest "
    finally:
        namespace["files"].close()


@pytest.mark.slow
def test_celery_example_needs_no_root_and_its_web_app_starts_the_sweeper(
    redis_url: str, tmp_path: Path
) -> None:
    """celery_app.py with only REDIS_URL set keeps its files in ./batchtrack-data of the
    folder it runs in, and web_app() starts the sweeper the Celery page tells you to run."""
    pytest.importorskip("celery")
    code = textwrap.dedent(
        """
        import threading
        import celery_app

        def sweepers():
            return [t for t in threading.enumerate() if t.name == "batchtrack-sweeper"]

        assert sweepers() == []
        app = celery_app.web_app()
        print(len(sweepers()), celery_app.files.url)
        celery_app.runner.stop_sweeper()
        celery_app.tracker.store.close()
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("FILES_URL", "STORE_URL")}
    env["REDIS_URL"] = redis_url
    env["PYTHONPATH"] = os.pathsep.join(
        [str(DOCS / "examples"), *filter(None, [env.get("PYTHONPATH")])]
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
        env=env,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    count, url = result.stdout.split()
    assert count == "1"
    assert url == (tmp_path / "batchtrack-data").resolve().as_uri()
    assert (tmp_path / "batchtrack-data").is_dir()
