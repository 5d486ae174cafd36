"""Bad input at the command line: every malformed manifest is refused before anything is sent.

The corpus is ``tests/manifests/bad/*.yaml`` (each file says where its first
error is: ``# expect: FILE:LINE FIELD``, and what the message says: ``# says:``)
plus a few cases made here because they are awkward as files in the
repository (bytes that are not UTF-8, a folder named like a prompts file, a
YAML alias bomb, nesting deeper than Python's stack). Each runs as
``wanbatch run MANIFEST --base-url SIM`` with a valid key in the environment,
against one simulator serving in a thread for the whole module: it must exit
2, name file:line and the field, say what it found and what is allowed, make
no run folder, and the simulator must see no request.

A fresh interpreter per run would cost most of a second each. Instead one
helper process imports ``wanbatch.cli`` once and forks a child per run; each
child is a new process with its own stdout and stderr, running the same
``main(argv)`` that the ``wanbatch`` script runs. One test checks that the
real script gives the same exit code and message.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from helpers.paths import BAD_MANIFESTS
from helpers.proc import cli_env
from wanbatch.sim import SimConfig, SimHandle, running_sim

SPEED = 100.0  #: the simulator's clock; the control run is given the same
KEY = "sk-sim-beijing"
EXPECT = re.compile(r"^# expect: (\S+):(\d+|\*) (.+)$", re.M)

#: Runs in the helper process: import once, fork a child per job line read from stdin.
FORK_RUNNER = r"""
import encodings.utf_8_sig, gc, json, os, signal, sys, time, traceback
import wanbatch.api, wanbatch.sim.cli  # what `wanbatch run` imports on its way: no child pays for it
from wanbatch.cli import main
gc.freeze()  # children share these objects' pages instead of copying them all at their first collection

def child(job):
    os.chdir(job["cwd"])
    for fd, name in ((1, "stdout"), (2, "stderr")):
        os.dup2(os.open(job[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), fd)
    code = 1
    try:
        code = main(job["argv"]) or 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

for line in sys.stdin:
    job = json.loads(line)
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        child(job)
    deadline, rc = time.monotonic() + job["timeout_s"], None
    while rc is None:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            rc = os.waitstatus_to_exitcode(status)
        elif time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            rc = "timeout"
        else:
            time.sleep(0.002)
    print(json.dumps({"rc": rc}), flush=True)
"""


# --- the cases --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Case:
    name: str
    path: Path
    file: str  #: the file the first error names (the manifest, or a prompts file)
    line: int | None  #: None: any line
    field: str | None  #: "-": no field; None: any
    says: tuple[str, ...]
    timeout_s: float = 20.0


def read_case(path: Path, *, timeout_s: float = 20.0) -> Case:
    text = path.read_bytes().decode("utf-8", "replace")
    found = EXPECT.search(text)
    assert found, f"{path.name} lacks an '# expect: FILE:LINE FIELD' line"
    line = None if found[2] == "*" else int(found[2])
    field_ = None if found[3] == "*" else found[3]
    says = tuple(re.findall(r"^# says: (.+)$", text, re.M))
    return Case(path.stem, path, found[1], line, field_, says, timeout_s)


def _alias_bomb() -> str:
    """Nine anchors, each nine times the one before: 43 million values once aliases are followed."""
    lines = ['x0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"x{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 8)]
    return "\n".join(lines) + "\ndefaults: {model: wan2.2-t2i-flash}\nprompts: [a red fox]\n"


#: Made in a temporary folder: (body, timeout_s). Headers as in the corpus; ``*`` means any line.
GENERATED: dict[str, tuple[bytes, float]] = {
    "not_utf8": (
        b"# expect: not_utf8.yaml:5 -\n# says: not UTF-8\n"
        b"defaults: {model: wan2.2-t2i-flash}\nprompts:\n  - a red fox \xff\xfe in snow\n",
        20.0,
    ),
    "file_is_folder": (
        b"# expect: file_is_folder.yaml:5 prompts[0].file\n# says: found a folder\n"
        b"defaults: {model: wan2.2-t2i-flash}\nprompts:\n  - file: data/folder.txt\n",
        20.0,
    ),
    "deep_nesting": (
        b"# expect: deep_nesting.yaml:3 -\n# says: nested too deep\n"
        b"prompts: " + b"[" * 3000 + b"a fox" + b"]" * 3000 + b"\n",
        20.0,
    ),
    # A fixed loader answers in milliseconds; the timeout only stops one that follows every alias.
    "alias_bomb": (b"# expect: alias_bomb.yaml:* -\n# says: aliases\n" + _alias_bomb().encode(), 5.0),
}

#: Cases the loader gets wrong today: strict xfails, so a fix shows up as XPASS. None at present.
LOADER_BUGS: dict[str, str] = {}


def corpus_files() -> list[Path]:
    return sorted(BAD_MANIFESTS.glob("*.yaml"))


def all_names() -> list[str]:
    return [path.stem for path in corpus_files()] + list(GENERATED)


def _marked(names: list[str]) -> list:
    return [
        pytest.param(name, id=name, marks=[pytest.mark.xfail(reason=LOADER_BUGS[name], strict=True)])
        if name in LOADER_BUGS
        else name
        for name in names
    ]


# --- one simulator and one fork runner for the module ----------------------------------------------------


class ThreadedSim:
    """A simulator serving on its own event loop in a background thread, for subprocesses to call."""

    def __init__(self, config: SimConfig) -> None:
        self._config = config
        self._ready = threading.Event()
        self._thread = threading.Thread(target=asyncio.run, args=(self._serve(),), daemon=True)
        self.sim: SimHandle | None = None

    async def _serve(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        async with running_sim(self._config) as sim:
            self.sim = sim
            self._ready.set()
            await self._stop.wait()

    def __enter__(self) -> SimHandle:
        self._thread.start()
        assert self._ready.wait(20), "the simulator did not start"
        assert self.sim is not None
        return self.sim

    def __exit__(self, *exc_info: object) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


@dataclass
class Result:
    rc: int | str
    stdout: str
    stderr: str
    requests: int  #: requests the simulator received during this run
    out_dir: Path


@dataclass
class Runs:
    sim_url: str
    cwd: Path
    results: dict[str, Result] = field(default_factory=dict)
    cases: dict[str, Case] = field(default_factory=dict)


class ForkRunner:
    """The helper process: ``run(argv)`` forks a child running ``wanbatch.cli.main(argv)``."""

    def __init__(self, directory: Path, sim: SimHandle, env: dict[str, str]) -> None:
        self._dir, self._sim = directory, sim
        self._proc = subprocess.Popen(
            [sys.executable, "-c", FORK_RUNNER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=directory,
        )

    def run(self, name: str, argv: list[str], *, out_dir: Path, timeout_s: float) -> Result:
        before = sum(self._sim.requests.values())
        job = {
            "argv": argv,
            "cwd": str(self._dir),
            "stdout": str(self._dir / f"{name}.out"),
            "stderr": str(self._dir / f"{name}.err"),
            "timeout_s": timeout_s,
        }
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(json.dumps(job) + "\n")
        self._proc.stdin.flush()
        rc = json.loads(self._proc.stdout.readline())["rc"]
        read = lambda key: Path(job[key]).read_text(encoding="utf-8", errors="replace")  # noqa: E731
        return Result(rc, read("stdout"), read("stderr"), sum(self._sim.requests.values()) - before, out_dir)

    def close(self) -> None:
        assert self._proc.stdin is not None
        self._proc.stdin.close()
        self._proc.wait(10)


def run_argv(manifest: Path, out_dir: Path, base_url: str) -> list[str]:
    return ["run", str(manifest), "--out", str(out_dir), "--base-url", base_url, "--speed", f"{SPEED:g}"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runs]:
    """Every case run once, in order, against one simulator; then a valid manifest, which must reach it."""
    work = tmp_path_factory.mktemp("bad_input")
    generated = work / "generated"
    (generated / "data" / "folder.txt").mkdir(parents=True)
    cases = [read_case(path) for path in corpus_files()]
    for name, (body, timeout_s) in GENERATED.items():
        (generated / f"{name}.yaml").write_bytes(body)
        cases.append(read_case(generated / f"{name}.yaml", timeout_s=timeout_s))
    with ThreadedSim(SimConfig(speed=SPEED, durations=1.0)) as sim:
        done = Runs(sim_url=sim.base_url, cwd=work)
        runner = ForkRunner(work, sim, cli_env(DASHSCOPE_API_KEY=KEY))
        try:
            for case in cases:
                out_dir = work / "out" / case.name
                argv = run_argv(case.path, out_dir, sim.base_url)
                done.results[case.name] = runner.run(case.name, argv, out_dir=out_dir, timeout_s=case.timeout_s)
                done.cases[case.name] = case
            good = work / "good.yaml"
            good.write_text('defaults: {model: wan2.2-t2i-flash, n: 1, size: "512*512"}\nprompts: [a red fox]\n')
            out_dir = work / "out" / "good"
            done.results["good"] = runner.run(
                "good", run_argv(good, out_dir, sim.base_url), out_dir=out_dir, timeout_s=60
            )
        finally:
            runner.close()
        yield done


def place(case: Case) -> str:
    """A pattern for the case's ``FILE:LINE: `` as a message shows it (after a folder, or alone)."""
    line = r"\d+" if case.line is None else str(case.line)
    return rf"(^|\s|/){re.escape(case.file)}:{line}: "


# --- the tests ----------------------------------------------------------------------------------------


def test_corpus_has_at_least_forty_manifests() -> None:
    """The corpus of malformed manifests run at the command line holds at least 40 cases."""
    assert len(all_names()) >= 40


@pytest.mark.parametrize("name", _marked(all_names()))
def test_bad_manifest_is_refused_before_anything_is_sent(runs: Runs, name: str) -> None:
    """`wanbatch run` exits 2 naming file:line and the field, makes no run folder, sends no request."""
    case, result = runs.cases[name], runs.results[name]
    assert result.rc == 2, (result.rc, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    where = place(case)
    if case.field not in (None, "-"):
        where += re.escape(case.field) + ": "
    assert re.search(where, result.stderr, re.M), (where, result.stderr)
    for phrase in case.says:
        assert phrase in result.stderr, (phrase, result.stderr)
    assert result.stderr.count("nothing was sent") == 1, result.stderr
    assert not result.out_dir.exists()
    assert result.requests == 0


@pytest.mark.parametrize("name", _marked(all_names()))
def test_message_says_what_was_found_and_what_is_allowed(runs: Runs, name: str) -> None:
    """The error line at the expected place says what it found and what would be allowed there."""
    case, result = runs.cases[name], runs.results[name]
    located = [text for text in result.stderr.splitlines() if re.search(place(case), text)]
    assert located, result.stderr
    assert any("found" in text and "allowed" in text for text in located), located


def test_the_simulator_saw_nothing_from_the_whole_corpus(runs: Runs) -> None:
    """Across every malformed manifest the simulator received no request at all."""
    assert sum(result.requests for name, result in runs.results.items() if name != "good") == 0


def test_a_valid_manifest_does_reach_the_simulator(runs: Runs) -> None:
    """The same runner, key and simulator make and save an image for a valid manifest: the checks above can fail."""
    result = runs.results["good"]
    assert result.rc == 0, result.stderr
    assert result.requests > 0
    assert len(list((result.out_dir / "images").glob("*.png"))) == 1


def test_python_tags_in_yaml_run_nothing(runs: Runs) -> None:
    """A ``!!python/object/apply`` tag is read as plain YAML: the command in it never ran."""
    assert runs.results["yaml_python_tag"].rc == 2
    assert not (runs.cwd / "wanbatch-pwned").exists()


def test_the_wanbatch_script_answers_as_the_forked_runs_do(runs: Runs, tmp_path: Path) -> None:
    """The installed ``wanbatch`` script, a fresh process each, gives the same exit code and message."""
    script = Path(sys.executable).with_name("wanbatch")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "wanbatch"]
    names = ["csv_bad_cell", "yaml_syntax"]
    procs = {
        name: subprocess.Popen(
            [*command, *run_argv(runs.cases[name].path, tmp_path / name, runs.sim_url)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=cli_env(DASHSCOPE_API_KEY=KEY),
            cwd=runs.cwd,
        )
        for name in names
    }
    for name, proc in procs.items():
        _, stderr = proc.communicate(timeout=60)
        forked = runs.results[name]
        assert (proc.returncode, stderr.replace(str(tmp_path), "")) == (
            forked.rc,
            forked.stderr.replace(str(runs.cwd / "out"), ""),
        )
