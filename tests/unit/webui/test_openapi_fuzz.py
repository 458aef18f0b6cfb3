"""schemathesis against webui/openapi.json (issue 23): every operation, with inputs
made from the schema (valid and invalid), once with a session cookie (and its CSRF
token) and once with an API token, against the app on the kernel stand-in. No 5xx,
and every response conforms to the schema (status, content type, body, headers); a
request without the credentials, or with wrong ones, is refused.

The examples are drawn from a seed printed with each operation's run (pytest shows it
when one fails); WEBUI_SCHEMA_SEED=N replays it. WEBUI_SCHEMA_EXAMPLES sets the
examples per operation (default 15: the file takes well under a minute on two cores).

One check is left out: ``positive_data_acceptance`` (a schema-valid request must
succeed). The schema cannot say what the console refuses on purpose and documents
as a 400: loopback, multicast or IPv4-mapped real servers, an address of the other
family, an unknown service or real server in a change.
"""

from __future__ import annotations

import json
import os
import random

import hypothesis
import pytest
import schemathesis
from flask import Flask
from flask.testing import FlaskClient
from schemathesis import GenerationMode

from tests.unit.webui.support import BEARER, RID1, SID, csrf, login
from webui.api import OPENAPI

SEED = int(os.environ.get("WEBUI_SCHEMA_SEED") or random.SystemRandom().randrange(2**32))
EXAMPLES = int(os.environ.get("WEBUI_SCHEMA_EXAMPLES") or 15)
Credentials = dict[str, dict[str, str]]


class _Credentials:
    """A schemathesis auth provider for one test's credentials (headers, cookies):
    so it knows them for the ones to use, and checks that the API refuses requests
    without them or with others."""

    data: Credentials

    def get(self, case: schemathesis.Case, ctx: object) -> Credentials:
        return self.data

    def set(self, case: schemathesis.Case, data: Credentials, ctx: object) -> None:
        case.headers = {**(case.headers or {}), **data["headers"]}
        case.cookies = {**(case.cookies or {}), **data["cookies"]}


@pytest.fixture(params=["session", "token"])
def credentials(request: pytest.FixtureRequest, app: Flask) -> Credentials:
    """An admin's credentials: a logged-in session's cookie with its CSRF token (the
    console wants it on every change made with the cookie), or an API token."""
    if request.param == "token":
        return {"headers": dict(BEARER), "cookies": {}}
    c: FlaskClient = app.test_client()
    assert login(c).status_code == 302
    cookie = c.get_cookie("ipvs_console")
    assert cookie is not None
    return {"headers": {"X-CSRF-Token": csrf(c)}, "cookies": {"ipvs_console": cookie.value}}


OPERATIONS = [(method.upper(), path) for path, item in
              json.loads(OPENAPI.read_text())["paths"].items() for method in item
              if method in ("get", "put", "post", "delete", "patch")]


@pytest.mark.parametrize("mode", list(GenerationMode))
@pytest.mark.parametrize(("method", "path"), OPERATIONS)
def test_the_api_conforms_to_its_openapi_schema(app: Flask, credentials: Credentials,
                                                method: str, path: str,
                                                mode: GenerationMode) -> None:
    print(f"schemathesis seed {SEED}: replay with WEBUI_SCHEMA_SEED={SEED}")
    # the schema as the console serves it (/api/openapi.json), bound to the app
    schema = schemathesis.openapi.from_wsgi("/api/openapi.json", app, headers=dict(BEARER))
    schema.auth(refresh_interval=None)(type("Admin", (_Credentials,), {"data": credentials}))
    operation = schema[path][method]
    # half the examples on a service and real server that exist: their bodies reach
    # the service layer and the stand-in kernel, not only the lookup's 404/400
    known = {k: v for k, v in (("sid", SID), ("rid", RID1)) if "{" + k + "}" in path}
    strategy = operation.as_strategy(generation_mode=mode)
    if known:
        strategy = strategy | operation.as_strategy(generation_mode=mode,
                                                    path_parameters=known)

    @hypothesis.seed(SEED)
    @hypothesis.settings(max_examples=EXAMPLES, deadline=None, database=None,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(case=strategy)
    def check(case: schemathesis.Case) -> None:
        case.call_and_validate(excluded_checks=[schemathesis.checks.positive_data_acceptance])

    check()
