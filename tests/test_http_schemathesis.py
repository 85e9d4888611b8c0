"""schemathesis, property-based from our OpenAPI document, against the ASGI app."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from http_support import Service  # noqa: E402

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def test_api_never_errors_and_matches_its_document(tmp_path: Path) -> None:
    """Valid and invalid generated requests: never a 500; responses match the document."""
    service = Service(tmp_path)
    try:
        schema = schemathesis.openapi.from_asgi("/api/openapi.json", service.asgi)
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) >= 5  # schemathesis leaves out the document itself
        modes = [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE]
        for operation in operations:

            @given(case=st.one_of(*(operation.as_strategy(mode) for mode in modes)))
            @settings(
                max_examples=25,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            def exercise(case: Any) -> None:
                response = case.call()
                case.validate_response(response, checks=CHECKS)
                assert "Traceback" not in response.text

            exercise()
    finally:
        service.close()
