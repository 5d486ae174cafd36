"""Every command line the README prints, run as printed, in a copy of the project.

Lines that say ``--simulate`` run against the embedded simulator; lines that address the service run
against ``wanbatch sim`` on loopback, reached the way the README tells a user to point wanbatch elsewhere
(``DASHSCOPE_HTTP_BASE_URL``, with the simulator's demo key in place of the user's). The cron and systemd
lines are adapted only by their working directory. ``make test`` is the suite itself: it is dry-run. A line
with ``--out s3://BUCKET/...`` writes to a real S3 server on loopback (SeaweedFS), pointed at by the standard
``AWS_*`` variables as a user's own configuration would point at theirs.
A README line of a kind this module cannot run fails the coverage test, so no example goes unchecked.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers.paths import REPO
from helpers.proc import cli_env, start_sim
from helpers.seaweed import SeaweedServer

README = REPO / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
#: How long one README command may take (wall seconds); a real-time run waits out its tasks' likely end.
COMMAND_TIMEOUT_S = 240
#: The README's placeholder for the user's key, and the simulator's demo key that stands in for it.
KEY_PLACEHOLDER, DEMO_KEY = "sk-...", "sk-sim-beijing"
#: The kinds of command this module runs; a README line of any other kind is not covered.
RUNNABLE = re.compile(r"^(make (demo|test)|(\S*/)?wanbatch \S|python\b)")


@dataclass(frozen=True)
class Command:
    """One command of the README: the text to run, where it is printed, and what it needs around it."""

    text: str
    line: int
    kind: str  #: "shell", "cron", "systemd", "python", "cell" (Python with a top-level await)
    setup: str = ""  #: lines of its block run before it (the README's `export`s)
    workdir: str = ""  #: the working directory the README gives it, replaced by the project's copy

    @property
    def id(self) -> str:
        return f"README:{self.line}"


def readme_commands(text: str) -> list[Command]:
    """The commands in the README's code blocks, in order."""
    commands: list[Command] = []
    for block in FENCE.finditer(text):
        lang, body = block.group(1), block.group(2)
        first = text[: block.start()].count("\n") + 2
        lines = [(first + i, line) for i, line in enumerate(body.splitlines()) if line.strip()]
        if lang == "sh":
            exports = "\n".join(line for _, line in lines if line.startswith("export "))
            commands += [Command(line, n, "shell", setup=exports) for n, line in lines if not _setup_line(line)]
        elif lang == "cron":
            commands += [_cron(n, line) for n, line in lines if not line.startswith("#")]
        elif lang == "ini":
            workdir = next((line.split("=", 1)[1] for _, line in lines if line.startswith("WorkingDirectory=")), "")
            commands += [
                Command(line.split("=", 1)[1], n, "systemd", workdir=workdir.strip())
                for n, line in lines
                if line.startswith("ExecStart=")
            ]
        elif lang == "python":
            kind = "cell" if re.search(r"^\S.*\bawait\b", body, re.MULTILINE) else "python"
            commands.append(Command(body, first, kind))
    return commands


def _setup_line(line: str) -> bool:
    return line.startswith(("export ", "#"))


def _cron(number: int, line: str) -> Command:
    """A crontab line: five schedule fields, then the command; its ``cd DIR &&`` is its working directory."""
    command = line.split(None, 5)[5]
    found = re.match(r"cd (\S+) && ", command)
    return Command(command, number, "cron", workdir=found.group(1) if found else "")


COMMANDS = readme_commands(README.read_text(encoding="utf-8"))


def test_every_readme_command_is_of_a_kind_this_module_runs():
    """Each command line of the README's code blocks is one this module knows how to run and check."""
    assert {c.kind for c in COMMANDS} >= {"shell", "cron", "systemd", "python", "cell"}
    uncovered = []
    for command in COMMANDS:
        text = command.text
        if command.kind == "cron":
            text = text.split(" && ")[-1]
        if command.kind in ("shell", "cron", "systemd") and not RUNNABLE.match(_without_workdir(text, command)):
            uncovered.append(f"{command.id}: {command.text}")
    assert uncovered == []


def _without_workdir(text: str, command: Command) -> str:
    return text.removeprefix(command.workdir.rstrip("/") + "/") if command.workdir else text


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory):
    """A simulated service at real speed whose tasks end at once, standing in for the paid one."""
    sim = start_sim(tmp_path_factory.mktemp("readme-sim"), speed=1.0, config={"durations": {"*": 0}})
    yield sim
    sim.stop()


def make_project(tmp_path: Path) -> Path:
    """A copy of the project as a user has it after `make install`: jobs, Makefile, and .venv/bin/wanbatch."""
    copy = tmp_path / "project"
    shutil.copytree(REPO / "jobs", copy / "jobs")
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy2(REPO / name, copy / name)
    venv_bin = copy / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    for name, module in (("wanbatch", "wanbatch"), ("pytest", "pytest")):
        script = venv_bin / name
        script.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m {module} "$@"\n', encoding="utf-8")
        script.chmod(0o755)
    (copy / ".venv" / ".installed").touch()  # newer than pyproject.toml: make installs nothing
    return copy


def _env(project: Path, service, storage: Mapping[str, str] | None = None) -> dict[str, str]:
    return cli_env(
        PATH=f"{project / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}",
        PYTHONPATH=str(REPO),  # the wanbatch under test, whichever is installed
        DASHSCOPE_HTTP_BASE_URL=service.base_url,
        DASHSCOPE_API_KEY=DEMO_KEY,
        # A run into a bucket: the user's S3 settings stand for the test server's; the cache, for the state.
        XDG_CACHE_HOME=str(project.parent / "cache"),
        **(storage or {}),
    )


def _buckets(command: Command) -> list[str]:
    """The buckets a command's ``--out s3://BUCKET/...`` names."""
    return re.findall(r"--out s3://([^/\s]+)", command.text)


@dataclass
class Started:
    """A README command started in a project copy of its own; its output goes to files beside it."""

    project: Path
    proc: subprocess.Popen
    out: Path
    err: Path

    def finish(self) -> tuple[int, str, str]:
        try:
            code = self.proc.wait(COMMAND_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            code = -9
        return code, self.out.read_text(encoding="utf-8"), self.err.read_text(encoding="utf-8")


def _start(command: Command, project: Path, service, storage: Mapping[str, str]) -> Started:
    env = _env(project, service, storage)
    if command.kind in ("python", "cell"):
        runner = _CELL_RUNNER if command.kind == "cell" else "import sys; exec(sys.stdin.read())"
        argv, stdin = [sys.executable, "-c", runner], command.text
    else:
        text = command.text.replace(command.workdir, str(project)) if command.workdir else command.text
        setup = command.setup.replace(KEY_PLACEHOLDER, DEMO_KEY)
        argv, stdin = ["sh", "-c", f"{setup}\n{text}"], ""
    out, err = project.parent / "stdout", project.parent / "stderr"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = subprocess.Popen(argv, cwd=project, env=env, stdin=subprocess.PIPE, stdout=stdout, stderr=stderr)
    proc.stdin.write(stdin.encode())
    proc.stdin.close()
    return Started(project, proc, out, err)


@pytest.fixture(scope="module")
def started(tmp_path_factory: pytest.TempPathFactory, service, seaweed: SeaweedServer) -> dict[str, Started]:
    """Every README command but `make test`, started side by side: the ones that address the service at real
    speed spend most of their time waiting for their tasks' likely end. The buckets they name are made on the
    test S3 server first, as a user makes a bucket before using it."""
    client = seaweed.client()
    for bucket in {name for command in COMMANDS for name in _buckets(command)}:
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=bucket)
    runs = {
        command.id: _start(command, make_project(tmp_path_factory.mktemp("readme")), service, seaweed.env())
        for command in COMMANDS
        if not command.text.startswith("make test")
    }
    yield runs
    for run in runs.values():
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait()


def _popen_args(project: Path, env: dict[str, str]) -> dict:
    return {"cwd": project, "env": env, "capture_output": True, "text": True, "timeout": COMMAND_TIMEOUT_S}


#: Runs a notebook cell as Jupyter does: inside an event loop that is already running.
_CELL_RUNNER = textwrap.dedent("""\
    import ast, asyncio, sys
    async def cell():
        code = compile(sys.stdin.read(), "<cell>", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        result = eval(code, {"__name__": "__main__"})
        if asyncio.iscoroutine(result):
            await result
    asyncio.run(cell())
""")


@pytest.mark.parametrize("command", [pytest.param(c, id=c.id) for c in COMMANDS])
def test_readme_command_runs_as_printed(
    command: Command, started: dict[str, Started], service, tmp_path, seaweed: SeaweedServer
):
    """The README's command runs as printed and does what the README says: a run saves every image."""
    if command.text.startswith("make test"):
        project = make_project(tmp_path)
        done = subprocess.run(["make", "-n", "test"], **_popen_args(project, _env(project, service)))
        assert done.returncode == 0 and ".venv/bin/pytest" in done.stdout, done.stderr
        return
    run = started[command.id]
    code, stdout, stderr = run.finish()
    assert code == 0, f"{command.text}\nstdout:\n{stdout[-2000:]}\nstderr:\n{stderr[-3000:]}"
    for out in _run_folders(command):
        if out.startswith("s3://"):  # the report is in the bucket, beside the images
            bucket, _, prefix = out.removeprefix("s3://").partition("/")
            answer = seaweed.client().get_object(Bucket=bucket, Key=f"{prefix}/report.json")
            report = json.loads(answer["Body"].read())
            assert report["outputs"]["location"] == out and report["outputs"]["not_stored"] == []
        else:
            report = json.loads((run.project / out / "report.json").read_text(encoding="utf-8"))
        items = report["items_in_manifest"]
        assert items.get("saved", 0) == sum(items.values()) > 0, (command.text, report["items"])
        assert report["images"]["saved"] > 0


def _run_folders(command: Command) -> list[str]:
    """The run folders a command writes: each `--out DIR` or `out="DIR"`, and make demo's."""
    found = re.findall(r"--out (\S+)|out=\"([^\"]+)\"", command.text)
    folders = [a or b for a, b in found]
    return folders + (["runs/demo"] if command.text.startswith("make demo") else [])
