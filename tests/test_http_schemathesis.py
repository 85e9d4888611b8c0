"""schemathesis, property-based from our OpenAPI document, against the ASGI app."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.core.parameters import ParameterLocation  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    positive_data_acceptance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from batchtrack import Item  # noqa: E402
from batchtrack._http import COOKIE  # noqa: E402
from http_support import Service  # noqa: E402
from test_openapi_conformance import CONFIG  # noqa: E402

SESSION = "5" * 32
"""The session cookie every generated request carries, so that it may see real batches."""

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
    positive_data_acceptance,
]


def _path_is_positive(case: Any) -> bool:
    """Whether the case's path was generated valid. A real batch id put into an invalid
    path would leave a case schemathesis still counts as negative for its path, while
    the request's only remaining flaw (say, an unknown query parameter, which the API
    ignores on purpose) is one it may accept."""
    meta = case.meta
    if meta is None:
        return True
    component = meta.components.get(ParameterLocation.PATH)
    return component is None or component.mode is schemathesis.GenerationMode.POSITIVE


def _real_batch(service: Service, tmp_path: Path) -> tuple[str, str]:
    """A finished batch of :data:`SESSION`: one item completed, one failed whose input is
    still there (so a retry is accepted); returns the batch and the completed item."""
    source = tmp_path / f"{uuid.uuid4()}.txt"
    source.write_bytes(b"not an image")
    snap = service.tracker.create_batch(
        [Item("done.jpg"), Item("broken.txt", source=str(source))], owner=f"session:{SESSION}"
    )
    done, broken = (item.id for item in snap.items)
    for item_id in (done, broken):
        service.tracker.start_item(snap.batch_id, item_id)
    service.tracker.complete_item(snap.batch_id, done)
    service.tracker.fail_item(snap.batch_id, broken, "not an image")
    return snap.batch_id, done


def test_api_never_errors_and_matches_its_document(tmp_path: Path) -> None:
    """Valid and invalid generated requests, for every operation and against real batches as
    well as unknown ones: never a 500; valid ones accepted, invalid ones refused; responses,
    headers included, match the document."""
    service = Service(tmp_path)
    try:
        schema = schemathesis.openapi.from_asgi(
            "/api/openapi.json", service.asgi, config=schemathesis.Config.from_str(CONFIG)
        )
        operations = [result.ok() for result in schema.get_all_operations()]
        # schemathesis leaves out the document itself
        assert {op.path for op in operations} == {
            "/upload",
            "/process-batch",
            "/batches",
            "/batch-status/{batchId}",
            "/batch-events/{batchId}",
            "/batch-results/{batchId}/{itemId}",
            "/batch-results/{batchId}.zip",
            "/batch-cancel/{batchId}",
            "/batch-retry/{batchId}",
            "/batch-pause/{batchId}",
            "/batch-unpause/{batchId}",
        }
        modes = [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE]
        for operation in operations:

            @given(
                case=st.one_of(*(operation.as_strategy(mode) for mode in modes)),
                real=st.booleans(),
            )
            @settings(
                max_examples=25,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            def exercise(case: Any, real: bool) -> None:
                if real and "batchId" in case.path_parameters and _path_is_positive(case):
                    batch_id, item_id = _real_batch(service, tmp_path)
                    case.path_parameters["batchId"] = batch_id
                    if "itemId" in case.path_parameters:
                        case.path_parameters["itemId"] = item_id
                response = case.call(cookies={COOKIE: SESSION})
                case.validate_response(response, checks=CHECKS)
                assert "Traceback" not in response.text

            exercise()
    finally:
        service.close()
