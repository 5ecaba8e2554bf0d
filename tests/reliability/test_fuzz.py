"""Property-based fuzzing of every operation in the server's OpenAPI schema (schemathesis).

The schema is built at import time by the app factory (the same code that serves
``/openapi.json``; ``test_the_fuzzed_schema_is_the_served_one`` checks they are identical),
because schemathesis' lazy ``from_fixture`` loader does not work with pytest 9. Requests go
to a live server. Each operation gets its explicit examples, schemathesis' coverage phase
(boundary values, missing and extra fields, wrong types) and random fuzzing, positive and
negative. Every response must be documented (status, content type, body schema), never a
5xx (the server is ready before the first case, so no 503 either), schema-invalid requests
must be refused, and error bodies must have the error shape and leak nothing.
``RELIABILITY_FUZZ_EXAMPLES`` sets the random examples per operation (the soak run uses more);
the run is repeatable (a fixed seed, ``RELIABILITY_FUZZ_SEED``).
"""

from __future__ import annotations

import os
import tempfile

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from service.http.app import create_app
from service.settings import Settings
from tests.reliability.fuzzing import REJECTION_STATUSES
from tests.reliability.helpers import assert_no_leak

MAX_EXAMPLES = int(os.environ.get("RELIABILITY_FUZZ_EXAMPLES", "25"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
# 405s and their Allow header (every method of the path) are held exactly by
# tests/service/test_hardening.py, for every path of the schema.


def _spec() -> dict:
    with tempfile.TemporaryDirectory() as data_dir:  # nothing is opened: no lifespan runs
        return create_app(Settings(model="unused", data_dir=data_dir)).openapi()


SPEC = _spec()
schema = schemathesis.openapi.from_dict(
    SPEC,
    config=schemathesis.Config.from_dict(
        {
            "seed": int(os.environ.get("RELIABILITY_FUZZ_SEED", "0")),  # repeatable; change it to explore
            "generation": {"mode": "all", "max-examples": MAX_EXAMPLES},
            "checks": {
                "negative_data_rejection": {"expected-statuses": [str(s) for s in REJECTION_STATUSES]}
            },
        }
    ),
)


def test_the_fuzzed_schema_is_the_served_one(rel_server):
    import httpx

    served = httpx.get(rel_server.url + "/openapi.json", timeout=30).json()
    assert served == SPEC


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_operation_answers_as_documented(case, rel_server):
    response = case.call(base_url=rel_server.url, timeout=60)
    case.validate_response(response, checks=CHECKS)
    content_type = (response.headers.get("content-type") or [""])[0]
    if response.status_code >= 400 and content_type.startswith("application/json"):
        body = response.json()
        error = body.get("error") if isinstance(body, dict) else None
        assert isinstance(error, dict) and error.get("type") and error.get("message"), body
        assert_no_leak(response.text, (rel_server.model_name,))
