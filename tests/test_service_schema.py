"""schemathesis over the server's OpenAPI document: every operation, with the admin token,
schemathesis's default checks (no 5xx, documented status codes, content types and headers,
responses that match their schema, invalid input refused, valid input accepted), against
``dyce-serve`` running in its own process."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from bench.serving_harness import ServerProcess
from service import Settings, create_app

# Enough to reach every documented status of every operation; bounded so CI stays ~1 minute.
EXAMPLES_PER_OPERATION = 25

# The document is built in-process at collection time (schemathesis parametrizes while pytest
# collects, before any server runs; its lazy fixture loader does not work with pytest 9), and
# test_the_live_server_serves_this_document checks it is the one the live server serves.
# Limits that are settings (the batch size) are in the document: the same as the live server's.
MAX_BATCH = 16
OPENAPI = create_app(Settings(admin_token="schema-only-token-never-served", max_batch_size=MAX_BATCH)).openapi()
schema = schemathesis.openapi.from_dict(OPENAPI)

# Every route of service/edge/routes/, written out by hand: the document must not lose or invent any.
OPERATIONS = {
    ("POST", "/v1/classify"),
    ("POST", "/v1/classify/batch"),
    ("GET", "/v2"),
    ("GET", "/v2/health/live"),
    ("GET", "/v2/health/ready"),
    ("GET", "/v2/models/{name}"),
    ("GET", "/v2/models/{name}/versions/{version}"),
    ("GET", "/v2/models/{name}/ready"),
    ("GET", "/v2/models/{name}/versions/{version}/ready"),
    ("GET", "/v2/models/{name}/config"),
    ("GET", "/v2/models/{name}/versions/{version}/config"),
    ("POST", "/v2/models/{name}/infer"),
    ("POST", "/v2/models/{name}/versions/{version}/infer"),
    ("GET", "/admin/bank"),
    ("GET", "/admin/active"),
    ("POST", "/admin/active"),
    ("POST", "/admin/mode"),
    ("POST", "/admin/bank/reload"),
}


# What a schema cannot promise, refused with these messages and only these: a tier the loaded
# bank does not have (a MAC budget under its cheapest entry, an accuracy above its best), v1's two
# tier selectors (OpenAPI cannot make query parameters mutually exclusive), and binary parts that
# are not a decodable image.
SEMANTIC_REFUSALS = (
    (422, "no configuration fits"),
    (422, "no bank entry satisfies"),
    (400, "not both"),
    (400, "is not a PNG, JPEG or WebP image"),
    (415, "is not accepted; send one of PNG, JPEG, WEBP"),
    (400, "image is truncated or corrupt"),
)


@schemathesis.check
def valid_data_accepted_unless_semantically_refused(ctx, response, case):
    if any(response.status_code == status and text in response.text for status, text in SEMANTIC_REFUSALS):
        return None
    return positive_data_acceptance(ctx, response, case)


@pytest.fixture(scope="module")
def schema_server(core_demo_artifacts, tmp_path_factory) -> Iterator[ServerProcess]:
    # A copy: generated reload requests name files in the served directory.
    root = tmp_path_factory.mktemp("schema")
    artifacts = shutil.copytree(core_demo_artifacts, root / "artifacts")
    with ServerProcess(artifacts, root / "server.log", max_batch_size=MAX_BATCH, calibration_rounds=2) as server:
        yield server


def test_the_live_server_serves_this_document(schema_server):
    assert httpx.get(f"{schema_server.url}/openapi.json", timeout=10).json() == OPENAPI


def test_the_document_has_every_route_and_declares_its_errors():
    documented = {(method.upper(), path) for path, item in OPENAPI["paths"].items() for method in item}
    assert documented == OPERATIONS
    error = OPENAPI["components"]["schemas"]["ErrorBody"]
    assert set(error["required"]) == {"error", "code"}
    for path, item in OPENAPI["paths"].items():
        for method, operation in item.items():
            for status, response in operation["responses"].items():
                if status.startswith(("4", "5")):
                    body = response["content"]["application/json"]["schema"]
                    assert body == {"$ref": "#/components/schemas/ErrorBody"}, (method, path, status)
            assert "503" in operation["responses"], (method, path)


@schema.parametrize()
@settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_every_operation_honours_its_schema(case, schema_server):
    case.call_and_validate(
        base_url=schema_server.url,
        headers=schema_server.admin_headers,
        timeout=30,
        excluded_checks=[positive_data_acceptance],
        additional_checks=[valid_data_accepted_unless_semantically_refused],
    )
