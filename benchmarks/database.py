"""The PostgreSQL server the fleet's benchmarks use, and a schema of its own for each run.

The server is ``$WANBATCH_BENCH_POSTGRES`` (default ``postgresql://postgres@127.0.0.1:5432/test``, the tests'
server). Each run works in a fresh schema ``bench_<random>``, dropped with everything in it afterwards, so
that runs never see one another's batches. Commits wait for the WAL's flush (the server's default): a
benchmark measures what a user's database would cost.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

__all__ = ["DEFAULT_URL", "schema", "server_url", "unreachable"]

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"


def server_url() -> str:
    """The server's URL: ``$WANBATCH_BENCH_POSTGRES`` or the default."""
    return os.environ.get("WANBATCH_BENCH_POSTGRES") or DEFAULT_URL


def unreachable(url: str) -> str | None:
    """Why the server at ``url`` cannot be used (the first line of the error), or None when it answers."""
    try:
        with psycopg.connect(url, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        return f"no PostgreSQL at {url}: {str(exc).strip().splitlines()[0]}"
    return None


@contextmanager
def schema(url: str) -> Iterator[str]:
    """A URL of the server at ``url`` whose connections work in a new schema, dropped when the block ends."""
    name = f"bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA {name}")
        try:
            yield f"{url}{'&' if '?' in url else '?'}options=-csearch_path%3D{name}"
        finally:
            admin.execute(f"DROP SCHEMA {name} CASCADE")
