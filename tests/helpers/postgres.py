"""A real PostgreSQL server for the tests of the PostgreSQL ledger.

The server is not started here: it is the one at ``$WANBATCH_TEST_POSTGRES`` (default
``postgresql://postgres@127.0.0.1:5432/test``). ``postgres_server`` (session-scoped) checks once that it answers;
when it does not, every test that needs it is skipped with one reason, or fails when
``WANBATCH_REQUIRE_POSTGRES=1`` (CI sets it, so that a missing server cannot pass unseen). ``pg_url`` (per test)
is a URL whose ``search_path`` is a fresh schema ``t_<random>``, dropped with everything in it after the test.
Its connections commit without waiting for the WAL's flush (``synchronous_commit=off``): a third less time a
write, and nothing a test checks depends on a commit surviving the server's machine losing power.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import psycopg
import pytest

__all__ = ["DEFAULT_URL", "pg_url", "postgres_admin", "postgres_server", "pytest_runtest_makereport", "schema_url"]

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"
_NO_SERVER = "no PostgreSQL at "


def schema_url(url: str, schema: str) -> str:
    """``url`` with its connections' ``search_path`` set to ``schema`` and commits not waiting for the flush (libpq
    options)."""
    return f"{url}{'&' if '?' in url else '?'}options=-csearch_path%3D{schema}%20-csynchronous_commit%3Doff"


@pytest.fixture(scope="session")
def postgres_server() -> str:
    """The test server's URL, once it has answered; skips (or fails, when required) if it does not."""
    url = os.environ.get("WANBATCH_TEST_POSTGRES") or DEFAULT_URL
    _check_server(url)
    return url


def _check_server(url: str) -> None:
    try:
        with psycopg.connect(url, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        reason = f"{_NO_SERVER}{url} ({str(exc).strip().splitlines()[0]}): set WANBATCH_TEST_POSTGRES"
        if os.environ.get("WANBATCH_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"{reason}; WANBATCH_REQUIRE_POSTGRES=1 asks for it")
        pytest.skip(reason)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """Every test skipped for want of the server is reported at one place, so that ``-ra`` folds them into one
    line (each test's own place would make one line per test)."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and isinstance(report.longrepr, tuple) and _NO_SERVER in report.longrepr[2]:
        report.longrepr = (__file__, _check_server.__code__.co_firstlineno, report.longrepr[2])


@pytest.fixture(scope="session")
def postgres_admin(postgres_server: str) -> Iterator[psycopg.Connection]:
    """One connection of the session that makes and drops the tests' schemas (a connection each time is slower)."""
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        yield conn


@pytest.fixture
def pg_url(postgres_server: str, postgres_admin: psycopg.Connection) -> Iterator[str]:
    """A URL of the test server whose connections work in a schema of their own, dropped after the test."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    postgres_admin.execute(f"CREATE SCHEMA {schema}")
    try:
        yield schema_url(postgres_server, schema)
    finally:
        postgres_admin.execute(f"DROP SCHEMA {schema} CASCADE")
