"""Schemathesis hooks of the OpenAPI fuzz (the ``st`` command loads them through
``SCHEMATHESIS_HOOKS``): keep cases from harming the test session, and say which refusals
of schema-valid input are the API's own rules rather than a mismatch with its schema."""

from __future__ import annotations

import json
import os
from typing import Any

import schemathesis

# Generating codes is the one operation whose cost grows with its input (up to 50 million
# codes); valid counts are kept cheap.
MAX_GENERATE = 100
SCHEMA_MAX_GENERATE = 50_000_000
_PROTECTED = frozenset(filter(None, os.environ.get("FUZZ_PROTECTED_USERS", "").split(",")))
VALIDATION_ERROR = "https://voucher-engine.dev/problems/validation-error"


@schemathesis.hook
def filter_case(context: Any, case: Any) -> bool:
    # never change the roles of the bootstrap admin or of the fuzz's own admin
    return (case.path_parameters or {}).get("user_id") not in _PROTECTED


@schemathesis.hook
def map_case(context: Any, case: Any) -> Any:
    if case.path.endswith("/generate") and isinstance(case.body, dict):
        count = case.body.get("count")
        if type(count) is int and MAX_GENERATE < count <= SCHEMA_MAX_GENERATE:
            case.body["count"] = MAX_GENERATE
    return case


def _problem(response: Any) -> dict[str, Any]:
    try:
        body = json.loads(response.content)
    except (ValueError, TypeError):
        return {}
    return body if isinstance(body, dict) else {}


@schemathesis.hook
def filter_failure(context: Any, failure: Any, case: Any, response: Any) -> bool:
    """Which "schema-valid request rejected" failures are not one.

    A schema-valid request may still break a rule JSON Schema cannot say (one field that
    needs another, a template that does not compile, an id of the wrong shape, a time
    range too long): the API answers those with a 422 problem of its own type. And no
    string may hold a NUL character (the API's description says so; Postgres cannot store
    one): those are ``unstorable_text`` validation errors; and metadata has a size and a
    depth JSON Schema does not bound: ``invalid_metadata``. Any other 422
    ``validation-error`` is the request model refusing what the schema allows -- a real
    mismatch, kept -- and so is every other status."""
    if getattr(failure, "code", None) == "ST202" and response.status_code == 410:
        # what the request found (a code of a campaign that ended, listed by the code list
        # or the history), a documented answer of the checkout routes, not a schema mismatch
        return not _problem(response).get("code")
    if getattr(failure, "code", None) != "ST202" or response.status_code != 422:
        return True
    problem = _problem(response)
    if problem.get("type") != VALIDATION_ERROR:
        return not problem  # the API's own rule (a problem of another type): not a failure
    kinds = {e.get("type") for e in problem.get("errors") or [] if isinstance(e, dict)}
    return not kinds or not kinds <= {"unstorable_text", "invalid_metadata"}
