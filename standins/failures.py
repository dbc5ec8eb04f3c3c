"""Failure injection shared by the stand-ins: `/_standin/fail` rules that make matching calls
fail, either before anything happens or after the call was applied (only the answer is lost)."""
from __future__ import annotations

import time

from flask import jsonify


def add_rule(failures: list[dict], body: dict) -> None:
    """Apply a `/_standin/fail` body: `{"clear": true}` removes every rule; anything else is one
    more rule (see `next_failure`; `count` defaults to 1). Call under the stand-in's lock."""
    if body.get("clear"):
        failures.clear()
    else:
        failures.append({"count": 1, **body})


def next_failure(failures: list[dict], method: str, path: str) -> dict | None:
    """The rule that fails this call, if any, consuming one of its `count`. A rule is
    `{"path_prefix", "count", "status", "method"?, "after"? (calls to let through first),
    "apply"? (apply the call, then lose its answer)}`. Call under the stand-in's lock."""
    for failure in failures:
        if failure["count"] > 0 and path.startswith(failure["path_prefix"]) \
                and failure.get("method", method) == method:
            if failure.get("after", 0) > 0:
                failure["after"] -= 1
                continue
            failure["count"] -= 1
            return failure
    return None


def answer_after_apply(response, failure: dict | None, error_body: dict):
    """For an `apply` rule: the call already happened; now lose its answer, either by waiting
    past the client's timeout (`sleep`) or by answering `status` with `error_body`."""
    if failure is None:
        return response
    if failure.get("sleep"):
        time.sleep(float(failure["sleep"]))
        return response
    lost = jsonify(error_body)
    lost.status_code = int(failure["status"])
    return lost
