"""The error tree as drawn, the one table of codes, and the advice each error carries."""

from __future__ import annotations

import re

import pytest

import wanbatch
from wanbatch import errors
from wanbatch.errors import (
    AccountError,
    ApiError,
    ManifestError,
    ManifestInvalid,
    RejectedError,
    classify_api_error,
    proves_no_task,
)


def test_the_drawn_tree_is_the_class_tree() -> None:
    """Every error class of the module stands in the docstring's tree, under the class it derives from."""
    parents: dict[int, str] = {}
    drawn: dict[str, str | None] = {}
    for line in errors.__doc__.splitlines():
        found = re.match(r"([ │├└─]*)([A-Z]\w+)\s", line + " ")
        if not found or not hasattr(errors, found.group(2)):
            continue
        depth = len(found.group(1)) // 4 - 1  # the root stands four columns in, each level four more
        parents[depth] = found.group(2)
        drawn[found.group(2)] = parents.get(depth - 1)
    classes = {name for name in errors.__all__ if isinstance(getattr(errors, name), type)}
    assert set(drawn) == classes
    for name, parent in drawn.items():
        base = getattr(errors, name).__mro__[1].__name__
        assert base == (parent or "Exception"), name


@pytest.mark.parametrize(
    ("status", "code", "proves"),
    [
        (429, "Throttling.RateQuota", True),
        (429, None, True),  # a 429 whose body did not parse
        (400, "InvalidParameter", True),
        (400, "DataInspectionFailed", True),
        (401, "InvalidApiKey", True),
        (400, "InternalError.Timeout", False),  # failed inside: the task may exist
        (500, "InternalError", False),
        (503, "InvalidParameter", False),  # a gateway's 5xx proves nothing, whatever its code
        (400, "", False),
    ],
)
def test_only_the_services_refusal_proves_that_a_create_made_no_task(status, code, proves) -> None:
    """A 429 or a 4xx with a refusing code proves no task was made; a 5xx or a failure inside does not."""
    assert proves_no_task(status, code) is proves


def test_the_advice_is_on_the_error() -> None:
    """An account's error says what to do about it; a refused request and a listed manifest say nothing more."""
    assert "Top up" in classify_api_error(400, "Arrearage", "").advice
    assert "Check the key" in classify_api_error(401, "InvalidApiKey", "").advice
    assert "may use this model" in classify_api_error(403, "Model.AccessDenied", "").advice
    assert "network" in ApiError(0, errors.UNREACHABLE, "8 connections failed").advice
    assert isinstance(classify_api_error(400, "PostpaidBillOverdue", ""), AccountError)
    assert isinstance(classify_api_error(400, "InvalidParameter", ""), RejectedError)
    assert classify_api_error(400, "InvalidParameter", "").advice == ""
    assert ManifestError("bad").advice == "nothing was sent."
    assert ManifestInvalid([ManifestError("bad")]).advice == ""


def test_the_public_names_of_errors_stay_where_they_were() -> None:
    """BudgetExceeded is importable from the package, and MalformedAnswer from the wire's module, as before."""
    from wanbatch.service.wire import MalformedAnswer

    assert wanbatch.BudgetExceeded is errors.BudgetExceeded and issubclass(errors.BudgetExceeded, errors.ConfigError)
    assert MalformedAnswer is errors.MalformedAnswer
