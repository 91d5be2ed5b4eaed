"""schemathesis against a live `lcmq api` process: every generated request, valid or not, gets a
documented status (never a 5xx) and a body that matches /openapi.json."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from lcmq import access, api
from tests.support.api_server import start_api

EXAMPLES_PER_OPERATION = 10
# A schema-valid request may still be refused for what it means (a model profile that does not
# exist, a row whose size is not a multiple of 8, a batch id that names nothing): 422 and 404 are
# the right answers there, so "valid data must be accepted" is not checked.
NOT_CHECKED = [positive_data_acceptance]


def test_no_5xx_and_no_schema_violation_for_any_generated_request(services_env, procs):
    server = start_api(procs, services_env)
    key = access.create_key(api.repository(), f"schemathesis-{server.url.rsplit(':', 1)[1]}", admin=True)
    headers = {"Authorization": f"Bearer {key.key}"}
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 13  # every /v1 route is documented

    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case):
            case.call_and_validate(headers=headers, timeout=30, excluded_checks=NOT_CHECKED)

        check()
