"""The in-container agent (protocol v2), run for real as subprocesses of this machine.

Each test drives `python -S -u -c LOADER` through encode_stdin and AgentStreamDecoder, as the operator
does over exec, with a temporary state directory. Tests that need a PID 1 that never reaps, or a
read-only file system, use Linux namespaces (util-linux `unshare`/`nsenter`, as root).
"""

from __future__ import annotations

import builtins
import contextlib
import io
import itertools
import json
import os
import queue
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import types
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest

from pythontask.agent import agent as agent_module
from pythontask.agent_protocol import (
    FORGET_ACK,
    LOADER,
    AgentStreamDecoder,
    Message,
    Output,
    agent_command,
    encode_stdin,
)
from support import procs

PYTHON = sys.executable
T = TypeVar("T")
IS_ROOT = os.geteuid() == 0
HAS_UNSHARE = shutil.which("unshare") is not None and shutil.which("nsenter") is not None
needs_namespaces = pytest.mark.skipif(not (IS_ROOT and HAS_UNSHARE), reason="needs root and util-linux")


def eventually(probe: Callable[[], T], *, within: float = 20.0, what: str = "it") -> T:
    """Polls `probe` until it returns a truthy value; fails at the deadline."""
    deadline = time.monotonic() + within
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within:g}s waiting for {what}; last: {value!r}")
        time.sleep(0.01)


def interpreter(version: str) -> str | None:
    """A pyenv interpreter of that version, if this machine has one."""
    for root in (Path.home() / ".pyenv/versions", Path("/root/.pyenv/versions")):
        for candidate in sorted(root.glob(f"{version}.*/bin/python{version[0]}")):
            if os.access(candidate, os.X_OK):
                return str(candidate)
    found = shutil.which(f"python{version}")
    return found if found and "shims" not in found else None


def run_request(d: Path, python: str = PYTHON, **fields: Any) -> dict[str, Any]:
    request: dict[str, Any] = {
        "op": "run",
        "dir": str(d),
        "tail": 65536,
        "python": [python],
        "args": [],
        "env": {},
        "workingDir": None,
        "scriptPath": None,
        "maxOutputBytes": 1 << 30,
        "mask": [],
    }
    request.update(fields)
    return request


class Reply:
    """Everything one agent sent: its messages in order, and the script's output from the O/E frames."""

    def __init__(self, data: bytes, stderr: bytes, returncode: int) -> None:
        decoder = AgentStreamDecoder()
        self.messages: list[dict[str, Any]] = []
        self.stdout = bytearray()
        self.stderr = bytearray()
        for event in decoder.feed(data):
            if isinstance(event, Message):
                self.messages.append(event.fields)
            else:
                (self.stdout if event.stream == "stdout" else self.stderr).extend(event.data)
        assert decoder.pending == 0, "the agent cut a frame"
        self.agent_stderr = stderr
        self.returncode = returncode

    @property
    def types(self) -> list[str]:
        return [m["type"] for m in self.messages if m["type"] != "heartbeat"]

    def one(self, kind: str) -> dict[str, Any]:
        found = [m for m in self.messages if m["type"] == kind]
        assert len(found) == 1, (kind, self.messages)
        return found[0]


def call(
    request: dict[str, Any],
    script: bytes | None = None,
    *,
    ack: bytes = b"",
    python: str = PYTHON,
    prefix: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    preexec_fn: Callable[[], None] | None = None,
    timeout: float = 60,
) -> Reply:
    """One agent exec with all its stdin at once (an `ack` line is read only after the result)."""
    done = subprocess.run(
        [*prefix, *agent_command([python])],
        input=encode_stdin(request, script) + ack,
        capture_output=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        preexec_fn=preexec_fn,
        check=False,
    )
    reply = Reply(done.stdout, done.stderr, done.returncode)
    assert not done.stderr, done.stderr  # the agent reports failures as messages, never a traceback
    return reply


class Agent:
    """One agent exec streamed as it goes (stdin stays open until close())."""

    def __init__(
        self,
        request: dict[str, Any],
        script: bytes | None = None,
        *,
        prefix: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        read: bool = True,
    ) -> None:
        self.proc = subprocess.Popen(
            [*prefix, *agent_command([PYTHON])],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, **(env or {})},
        )
        assert self.proc.stdin is not None
        self.proc.stdin.write(encode_stdin(request, script))
        self.proc.stdin.flush()
        self.messages: list[tuple[float, dict[str, Any]]] = []
        self.stdout = bytearray()
        self.events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.reader: threading.Thread | None = None
        if read:
            self.reader = threading.Thread(target=self._read, daemon=True)
            self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        decoder = AgentStreamDecoder()
        while data := os.read(self.proc.stdout.fileno(), 65536):
            for event in decoder.feed(data):
                if isinstance(event, Output):
                    if event.stream == "stdout":
                        self.stdout.extend(event.data)
                    self.events.put({"type": "output"})
                else:
                    self.messages.append((time.monotonic(), event.fields))
                    self.events.put(event.fields)
        self.events.put(None)

    def wait_for(self, kind: str, within: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + within
        while True:
            try:
                event = self.events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {kind!r} within {within:g}s: {self.types}") from None
            if event is None:
                raise AssertionError(f"the agent ended without {kind!r}: {self.types}")
            if event["type"] == kind:
                return event

    def wait_output(self, text: bytes, within: float = 30) -> None:
        eventually(lambda: text in self.stdout, within=within, what=f"{text!r} on stdout")

    @property
    def types(self) -> list[str]:
        return [m["type"] for _, m in self.messages if m["type"] != "heartbeat"]

    def send(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def close(self, within: float = 30) -> int:
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.close()
        code = self.proc.wait(within)
        if self.reader is not None:
            self.reader.join(within)
        assert self.proc.stderr is not None
        assert not self.proc.stderr.read()
        return code


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def reaped() -> Iterator[None]:
    """Fails the test if it leaves a zombie among our children (the agents are ours)."""
    yield
    me = str(os.getpid())
    zombies = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                fields = stat[stat.rindex(")") + 2 :].split()
                if fields[1] == me and fields[0] == "Z":
                    zombies.append(entry.name)
    assert not zombies


def fate_of(d: Path) -> str:
    return (d / "fate").read_text()


# ---------------------------------------------------------------------------------------------------
# Running, following, forgetting

EXACT_SCRIPT = b"""
import os, sys
sys.stdout.buffer.write(b"out:\\x00\\xff " + " ".join(sys.argv[1:]).encode() + b"\\n")
sys.stdout.flush()
sys.stderr.write("err:" + os.environ["GREETING"] + " unbuffered=" + os.environ["PYTHONUNBUFFERED"] + "\\n")
print("cwd:" + os.getcwd())
sys.exit(3)
"""


@pytest.mark.parametrize("python", [PYTHON, interpreter("3.8")], ids=["this-python", "python3.8"])
def test_run_reports_exit_code_exact_output_and_totals(
    state: Path, tmp_path: Path, python: str | None, reaped: None
) -> None:
    if python is None:
        pytest.skip("no Python 3.8 on this machine")
    d = state / "task-uid" / "attempt-1"
    request = run_request(
        d, python, args=["a", "b c"], env={"GREETING": "hi"}, workingDir=str(tmp_path), mask=["s3cret"]
    )
    reply = call(request, EXACT_SCRIPT, python=python)

    assert reply.types == ["accepted", "started", "caughtUp", "result"]
    assert reply.one("accepted")["fresh"] is True
    started = reply.one("started")
    assert isinstance(started["pid"], int)
    assert started["mask"] == ["s3cret"]
    stdout = b"out:\x00\xff a b c\ncwd:" + str(tmp_path).encode() + b"\n"
    stderr = b"err:hi unbuffered=1\n"
    assert bytes(reply.stdout) == stdout
    assert bytes(reply.stderr) == stderr
    message = reply.one("result")
    assert message["totals"] == {"stdout": len(stdout), "stderr": len(stderr)}
    result = message["result"]
    assert result["exitCode"] == 3
    assert not {"signal", "killedBy", "outputLimitExceeded"} & result.keys()
    assert result["oomKilled"] is False
    assert result["startedAt"] <= result["finishedAt"]
    assert result["resources"]["scriptPeakRSSBytes"] > 0
    assert reply.returncode == 0

    # No acknowledgement (stdin ended): the files stay, for a later follow.
    assert sorted(p.name for p in d.iterdir()) == [
        "fate", "mask.json", "pid", "result.json", "script.py", "stderr", "stdout"
    ]  # fmt: skip
    assert fate_of(d).startswith("run ")
    assert (d / "mask.json").stat().st_mode & 0o777 == 0o600
    assert json.loads((d / "mask.json").read_text()) == ["s3cret"]

    # Following it replays the last `tail` bytes, then the same result; the ack removes everything.
    follow = call({"op": "follow", "dir": str(d), "tail": 5}, ack=FORGET_ACK, python=python)
    assert follow.types == ["started", "caughtUp", "result", "forgotten"]
    assert bytes(follow.stdout) == stdout[-5:]
    assert bytes(follow.stderr) == stderr[-5:]
    assert follow.one("started")["mask"] == ["s3cret"]
    assert follow.one("result") == message
    assert follow.one("forgotten")["removed"] == 1
    assert not d.exists()
    assert not d.parent.exists()  # the task dir went with its last attempt
    assert state.exists()


def test_the_ack_after_the_result_removes_the_attempt(state: Path, reaped: None) -> None:
    d = state / "task" / "a1"
    reply = call(run_request(d), b"print('x')", ack=FORGET_ACK)
    assert reply.types == ["accepted", "started", "caughtUp", "result", "forgotten"]
    assert reply.one("forgotten")["removed"] == 1
    assert not d.parent.exists()


def test_anything_but_forget_leaves_the_files(state: Path) -> None:
    d = state / "task" / "a1"
    reply = call(run_request(d), b"pass", ack=b"keep\n")
    assert reply.types == ["accepted", "started", "caughtUp", "result"]
    assert (d / "result.json").exists()


def test_script_path_and_a_missing_one(state: Path, tmp_path: Path) -> None:
    script = tmp_path / "job.py"
    script.write_text("import sys; print(sys.argv[0])")
    d = state / "task" / "a1"
    reply = call(run_request(d, scriptPath=str(script)), b"")
    assert reply.one("result")["result"]["exitCode"] == 0
    assert bytes(reply.stdout) == str(script).encode() + b"\n"
    assert not (d / "script.py").exists()

    missing = call(run_request(state / "task" / "a2", scriptPath="/nonexistent/job.py"), b"")
    assert missing.types == ["error"]
    assert missing.one("error")["reason"] == "ScriptNotFound"
    assert "/nonexistent/job.py" in missing.one("error")["message"]
    assert not (state / "task" / "a2").exists()


def test_an_attempt_dir_is_started_at_most_once(state: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    script = f"open({str(runs)!r}, 'a').write('ran\\n')".encode()
    d = state / "task" / "a1"
    first = call(run_request(d), script)
    second = call(run_request(d), script)
    assert first.one("accepted")["fresh"] is True
    assert second.one("accepted")["fresh"] is False  # followed, not started again
    assert second.one("result")["result"]["exitCode"] == 0
    assert runs.read_text() == "ran\n"


def test_a_claim_nobody_decided_is_tombstoned_by_its_follower(state: Path, tmp_path: Path) -> None:
    d = state / "task" / "a1"
    d.mkdir(parents=True)  # as a run agent that died between its claim and its supervisor's decision
    follow = call({"op": "follow", "dir": str(d), "tail": 10}, env={"PYTHONTASK_AGENT_DECIDE_TIMEOUT": "0.3"})
    assert follow.types == ["tombstoned"]
    assert fate_of(d).startswith("killed ")
    run = call(run_request(d, args=["a1"]), MARKED_SLEEPER.format(markers=str(tmp_path)).encode())
    assert run.types == ["tombstoned"]
    assert not (tmp_path / "a1").exists()


def test_a_missing_dir_is_reported_to_follow(state: Path) -> None:
    reply = call({"op": "follow", "dir": str(state / "nope" / "a1"), "tail": 10})
    assert reply.types == ["missing"]
    assert not (state / "nope").exists()


def test_a_follower_streams_a_running_script_to_its_end(state: Path) -> None:
    d = state / "task" / "a1"
    release = state.parent / "release"
    script = (
        f"import os, time\nprint('one')\nwhile not os.path.exists({str(release)!r}): time.sleep(0.01)\n"
        "print('two')\n"
    ).encode()
    runner = Agent(run_request(d), script)
    runner.wait_output(b"one\n")
    follower = Agent({"op": "follow", "dir": str(d), "tail": 65536})
    follower.wait_for("caughtUp")
    assert bytes(follower.stdout) == b"one\n"  # the replayed tail, before caughtUp
    release.touch()
    assert follower.wait_for("result")["result"]["exitCode"] == 0
    assert runner.wait_for("result")["result"]["exitCode"] == 0
    assert bytes(follower.stdout) == b"one\ntwo\n"
    follower.send(FORGET_ACK)
    assert follower.wait_for("forgotten")["removed"] == 1
    assert follower.close() == 0
    assert runner.close() == 0  # its stdin ended: the files were already gone, nothing else to do
    assert not d.exists()


# ---------------------------------------------------------------------------------------------------
# Kill, and the tombstone


MARKED_SLEEPER = """
import pathlib, sys, time
pathlib.Path({markers!r}, sys.argv[1]).touch()
print("ready", flush=True)
time.sleep(60)
"""


def test_a_kill_before_the_start_is_final(state: Path, tmp_path: Path) -> None:
    d = state / "task" / "a1"
    killed = call({"op": "kill", "dir": str(d), "grace": 1, "why": "Hang"})
    assert killed.types == ["killed"]
    assert killed.one("killed") == {
        "type": "killed", "wasRunning": False, "gone": True, "forced": False, "tombstoned": True
    }  # fmt: skip
    assert fate_of(d) == "killed Hang"

    script = MARKED_SLEEPER.format(markers=str(tmp_path)).encode()
    run = call(run_request(d, args=["a1"]), script)
    assert run.types == ["tombstoned"]
    follow = call({"op": "follow", "dir": str(d), "tail": 10})
    assert follow.types == ["tombstoned"]
    again = call({"op": "kill", "dir": str(d), "grace": 1, "why": "Hang"})
    assert again.one("killed")["tombstoned"] is True
    # The run agent has exited, and it reaps its supervisor first: nothing can start the script now.
    assert not (tmp_path / "a1").exists()
    assert not (d / "pid").exists()


def test_kills_racing_runs_either_tombstone_or_kill_the_started_script(state: Path, tmp_path: Path) -> None:
    markers = tmp_path / "markers"
    markers.mkdir()
    script = MARKED_SLEEPER.format(markers=str(markers)).encode()
    # From the kill well ahead of the run to well after the script started.
    offsets = [-0.08 + 0.01 * i for i in range(12)] + [0.15, 0.3, 0.5, 0.8]

    def race(i: int, offset: float) -> tuple[Reply, Reply]:
        d = state / "task" / f"a{i}"
        kill = {"op": "kill", "dir": str(d), "grace": 5, "why": "Hang"}

        run = run_request(d, args=[f"a{i}"])
        first, second = (kill, run) if offset < 0 else (run, kill)
        procs = []
        for request in (first, second):
            proc = subprocess.Popen(
                agent_command([PYTHON]), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
            assert proc.stdin is not None
            proc.stdin.write(encode_stdin(request, script if request["op"] == "run" else None))
            proc.stdin.flush()  # communicate() closes it
            procs.append(proc)
            time.sleep(abs(offset))  # spreads the two agents in time; not a synchronisation
        outputs = [proc.communicate(timeout=60) for proc in procs]
        replies = [Reply(out, err, proc.returncode) for (out, err), proc in zip(outputs, procs, strict=True)]
        run_reply, kill_reply = replies if first is not kill else replies[::-1]
        return run_reply, kill_reply

    with ThreadPoolExecutor(6) as pool:
        outcomes = list(pool.map(race, range(len(offsets)), offsets))

    tombstoned = killed_running = 0
    for i, (run_reply, kill_reply) in enumerate(outcomes):
        assert not run_reply.agent_stderr + kill_reply.agent_stderr
        killed = kill_reply.one("killed")
        if killed["tombstoned"]:
            tombstoned += 1
            assert run_reply.types in (["tombstoned"], ["accepted", "tombstoned"]), run_reply.types
            assert not (markers / f"a{i}").exists(), f"a{i} ran after its tombstone"
            assert fate_of(state / "task" / f"a{i}").startswith("killed")
        else:
            killed_running += 1
            assert (killed["wasRunning"], killed["gone"]) == (True, True), killed
            assert run_reply.types == ["accepted", "started", "caughtUp", "result"], run_reply.types
            result = run_reply.one("result")["result"]
            assert result["killedBy"]["why"] == "Hang"
            assert (result["exitCode"], result["signal"]) == (143, signal.SIGTERM)
    assert tombstoned > 0, killed_running
    assert killed_running > 0, tombstoned


def test_a_kill_needs_no_disk_space_for_a_script_that_runs(state: Path, tmp_path: Path, reaped: None) -> None:
    # The attempt directory can take no new file (a full or read-only disk): the kill must still work.
    d = state / "task" / "a1"
    runner = Agent(run_request(d, args=["a1"]), MARKED_SLEEPER.format(markers=str(tmp_path)).encode())
    runner.wait_output(b"ready\n")
    wrapper = ("unshare", "--mount", "sh", "-c", f'mount --bind -o ro {d} {d} && exec "$@"', "sh")
    killed = call({"op": "kill", "dir": str(d), "grace": 5, "why": "Hang"}, prefix=wrapper)
    assert killed.one("killed")["gone"] is True
    assert killed.one("killed")["wasRunning"] is True
    assert runner.wait_for("result")["result"]["signal"] == signal.SIGTERM


def test_an_attempt_started_by_an_older_agent_is_killed_not_tombstoned(
    state: Path, tmp_path: Path, reaped: None
) -> None:
    # Before the fate file, an attempt left only its pid record: it ran, so it is never a tombstone.
    d = state / "task" / "a1"
    runner = Agent(run_request(d, args=["a1"]), MARKED_SLEEPER.format(markers=str(tmp_path)).encode())
    runner.wait_output(b"ready\n")
    (d / "fate").unlink()  # what an agent of the previous protocol leaves
    killed = call({"op": "kill", "dir": str(d), "grace": 5, "why": "Hang"})
    assert killed.one("killed")["wasRunning"] is True
    assert killed.one("killed")["tombstoned"] is False
    assert runner.wait_for("result")["result"]["signal"] == signal.SIGTERM


def test_killing_a_running_script_records_who_killed_it(state: Path, tmp_path: Path, reaped: None) -> None:
    d = state / "task" / "a1"
    runner = Agent(run_request(d, args=["a1"]), MARKED_SLEEPER.format(markers=str(tmp_path)).encode())
    runner.wait_output(b"ready\n")
    killed = call({"op": "kill", "dir": str(d), "grace": 5, "why": "Hang"})
    assert killed.one("killed") == {
        "type": "killed", "wasRunning": True, "gone": True, "forced": False, "tombstoned": False
    }  # fmt: skip
    result = runner.wait_for("result")["result"]
    assert result["exitCode"] == 143
    assert result["signal"] == signal.SIGTERM
    assert result["killedBy"]["why"] == "Hang"
    assert result["oomKilled"] is False
    assert runner.close() == 0
    assert json.loads((d / "killed").read_text())["why"] == "Hang"


def test_a_script_that_ignores_sigterm_is_forced_and_not_taken_for_an_oom_kill(state: Path) -> None:
    d = state / "task" / "a1"
    script = (
        b"import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('ready')\ntime.sleep(60)"
    )
    runner = Agent(run_request(d), script)
    runner.wait_output(b"ready\n")
    killed = call({"op": "kill", "dir": str(d), "grace": 0.2, "why": "AttemptTimeout"})
    assert killed.one("killed")["forced"] is True
    assert killed.one("killed")["gone"] is True
    result = runner.wait_for("result")["result"]
    assert (result["exitCode"], result["signal"]) == (137, signal.SIGKILL)
    assert result["killedBy"]["why"] == "AttemptTimeout"
    assert result["oomKilled"] is False
    assert runner.close() == 0


def test_the_supervisor_has_its_own_session_and_forwards_sigterm(state: Path, tmp_path: Path) -> None:
    d = state / "task" / "a1"
    runner = Agent(run_request(d, args=["a1"]), MARKED_SLEEPER.format(markers=str(tmp_path)).encode())
    runner.wait_output(b"ready\n")
    supervisor = int(fate_of(d).split()[1])
    stat = Path(f"/proc/{supervisor}/stat").read_text()
    assert stat[stat.rindex(")") + 2 :].split()[3] == str(supervisor)  # a session leader: setsid
    os.kill(supervisor, signal.SIGTERM)  # as a container runtime stopping everything would
    result = runner.wait_for("result")["result"]
    assert (result["exitCode"], result["signal"]) == (143, signal.SIGTERM)
    assert "killedBy" not in result  # no kill op did it
    assert runner.close() == 0


def test_killing_a_finished_attempt_finds_nothing_running(state: Path) -> None:
    d = state / "task" / "a1"
    call(run_request(d), b"pass")
    killed = call({"op": "kill", "dir": str(d), "grace": 1, "why": "Hang"})
    assert killed.one("killed") == {
        "type": "killed", "wasRunning": False, "gone": True, "forced": False, "tombstoned": False
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# Forget


def test_forget_never_removes_a_running_attempt(state: Path, tmp_path: Path) -> None:
    task = state / "task"
    running, finished = task / "running", task / "finished"
    runner = Agent(run_request(running, args=["r"]), MARKED_SLEEPER.format(markers=str(tmp_path)).encode())
    runner.wait_output(b"ready\n")
    call(run_request(finished), b"pass")
    call({"op": "kill", "dir": str(task / "tombstone"), "grace": 1, "why": "Hang"})
    (task / "claimed").mkdir()  # claimed by a run agent that died before anything was decided

    reply = call({"op": "forget", "dirs": [str(running)], "tasks": []})
    assert reply.one("forgotten") == {
        "type": "forgotten", "removed": 0, "retained": 0, "skipped": 1, "skippedDirs": [str(running)]
    }  # fmt: skip
    reply = call({"op": "forget", "dirs": [], "tasks": [str(task)]})
    assert reply.one("forgotten")["removed"] == 3
    assert reply.one("forgotten")["skippedDirs"] == [str(running)]
    assert sorted(p.name for p in task.iterdir()) == ["running"]

    call({"op": "kill", "dir": str(running), "grace": 1, "why": "Hang"})
    assert runner.wait_for("result")["result"]["killedBy"]["why"] == "Hang"
    assert runner.close() == 0
    reply = call({"op": "forget", "dirs": [], "tasks": [str(task)]})
    assert reply.one("forgotten")["removed"] == 1
    assert not task.exists()


# ---------------------------------------------------------------------------------------------------
# Limits, heartbeats, late agents, broken streams


def test_output_past_the_limit_kills_the_script(state: Path) -> None:
    d = state / "task" / "a1"
    limit = 1 << 20
    # 64 KiB a millisecond at most: a poll interval (at most 0.2 s) of output is at most ~13 MiB.
    script = b"import sys, time\nwhile True:\n    sys.stdout.write('x' * 65536)\n    time.sleep(0.001)\n"
    reply = call(run_request(d, maxOutputBytes=limit), script)
    message = reply.one("result")
    result = message["result"]
    assert result["outputLimitExceeded"] is True
    assert result["exitCode"] == 143
    assert result["oomKilled"] is False
    total = (d / "stdout").stat().st_size + (d / "stderr").stat().st_size
    assert limit < total <= limit + 64 * 1024 * 200
    assert message["totals"]["stdout"] == total == len(reply.stdout)


def test_a_flood_after_a_silence_is_caught_as_quickly(state: Path) -> None:
    d = state / "task" / "a1"
    limit = 1 << 20
    # Quiet long enough for the size polls to back off, then 64 KiB a millisecond at most: polls near the
    # limit stay frequent enough (without that, 0.2 s of output, up to 13 MiB, could pass unseen).
    script = (
        b"import sys, time\ntime.sleep(1)\n"
        b"while True:\n    sys.stdout.write('x' * 65536)\n    time.sleep(0.001)\n"
    )
    result = call(run_request(d, maxOutputBytes=limit), script).one("result")
    assert result["result"]["outputLimitExceeded"] is True
    assert limit < result["totals"]["stdout"] <= limit + (4 << 20)


def test_output_past_the_limit_is_forced_when_sigterm_is_ignored(state: Path) -> None:
    d = state / "task" / "a1"
    script = (
        b"import signal, sys, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        b"while True:\n    sys.stdout.write('x' * 65536)\n    time.sleep(0.001)\n"
    )
    result = call(run_request(d, maxOutputBytes=1 << 20), script).one("result")["result"]
    assert result["outputLimitExceeded"] is True
    assert result["exitCode"] == 137
    assert result["oomKilled"] is False  # we killed it, not the OOM killer


def test_heartbeats_while_the_script_is_silent_and_while_waiting_for_the_ack(state: Path) -> None:
    d = state / "task" / "a1"
    beat = 0.2
    runner = Agent(
        run_request(d), b"import time; time.sleep(1.2)", env={"PYTHONTASK_AGENT_HEARTBEAT": str(beat)}
    )
    runner.wait_for("result")
    during = [t for t, m in runner.messages if m["type"] == "heartbeat"]
    assert len(during) >= 3
    stamps = [t for t, _ in runner.messages]
    assert max(b - a for a, b in itertools.pairwise(stamps)) < beat * 3
    for _ in range(2):
        runner.wait_for("heartbeat")  # still beating while the operator records the result
    runner.send(FORGET_ACK)
    assert runner.wait_for("forgotten")["removed"] == 1
    assert runner.close() == 0
    assert not d.exists()


def test_a_late_run_agent_starts_nothing(state: Path) -> None:
    d = state / "task" / "a1"
    reply = call(run_request(d), b"pass", env={"PYTHONTASK_AGENT_START_WINDOW": "-1"})
    assert reply.types == ["error"]
    error = reply.one("error")
    assert "reason" not in error  # an exec failure for the operator, not a configuration error
    assert "starts nothing" in error["message"]
    assert not d.exists()


def test_bad_requests_are_errors_without_tracebacks(state: Path) -> None:
    assert call({"op": "dance", "dir": str(state)}).one("error")["message"] == "unknown op 'dance'"
    done = subprocess.run(
        agent_command([PYTHON]), input=encode_stdin({"op": "run"})[:-3], capture_output=True, check=False
    )
    reply = Reply(done.stdout, done.stderr, done.returncode)
    assert reply.types == ["error"]
    assert not done.stderr
    assert "stdin closed" in reply.one("error")["message"]


def test_the_run_agent_outlives_its_stream_and_reaps_the_supervisor(state: Path, reaped: None) -> None:
    d = state / "task" / "a1"
    release = state.parent / "release"
    script = (
        f"import os, sys, time\nprint('ready', flush=True)\n"
        f"while not os.path.exists({str(release)!r}): time.sleep(0.01)\n"
        "for i in range(2000): print('line', i)\nsys.exit(5)\n"
    ).encode()
    runner = Agent(run_request(d), script, read=False)
    assert runner.proc.stdout is not None
    data = b""
    while b"ready" not in data:
        data += os.read(runner.proc.stdout.fileno(), 65536)
    runner.proc.stdout.close()  # the exec stream is gone; the script goes on
    supervisor = int(fate_of(d).split()[1])
    release.touch()
    assert runner.proc.wait(30) == 0
    assert procs.state(supervisor) is None  # reaped, not a zombie
    follow = call({"op": "follow", "dir": str(d), "tail": 10}, ack=FORGET_ACK)
    assert follow.one("result")["result"]["exitCode"] == 5
    assert bytes(follow.stdout) == b"line 1999\n"
    assert not d.exists()


# ---------------------------------------------------------------------------------------------------
# Configuration errors


def expect_not_writable(reply: Reply, path: str, errno_text: str, uid: int) -> None:
    assert reply.types == ["error"], reply.messages
    error = reply.one("error")
    assert error["reason"] == "StateDirNotWritable"
    assert path in error["message"]
    assert errno_text in error["message"]
    assert f"container user id {uid}" in error["message"]
    assert "emptyDir" in error["message"]
    assert "PYTHONTASK_STATE_DIR" in error["message"]
    assert reply.returncode != 0


@needs_namespaces
def test_a_read_only_state_dir_is_a_configuration_error(tmp_path: Path) -> None:
    mount = tmp_path / "ro"
    mount.mkdir()
    d = mount / "pythontask" / "task" / "a1"
    # A read-only tmpfs in a mount namespace of its own, for this one agent.
    wrapper = ("unshare", "--mount", "sh", "-c", f'mount -t tmpfs -o ro tmpfs {mount} && exec "$@"', "sh")
    reply = call(run_request(d), b"pass", prefix=wrapper)
    expect_not_writable(reply, str(mount / "pythontask"), "Read-only file system", 0)


@pytest.mark.skipif(not IS_ROOT or not os.path.exists("/usr/bin/python3"), reason="needs root")
def test_a_state_dir_the_container_user_cannot_write_is_a_configuration_error() -> None:
    # Not under pytest's tmp_path (only root may enter it); an interpreter outside /root for the same reason.
    base = Path(tempfile.mkdtemp(dir="/tmp"))
    try:
        base.chmod(0o755)
        state = base / "state"
        state.mkdir(mode=0o555)
        state.chmod(0o555)
        d = state / "task" / "a1"

        def as_nobody() -> None:
            os.setgid(65534)
            os.setuid(65534)

        reply = call(
            run_request(d, "/usr/bin/python3"), b"pass", python="/usr/bin/python3", preexec_fn=as_nobody
        )
        expect_not_writable(reply, str(state / "task"), "Permission denied", 65534)
        killed = call({"op": "kill", "dir": str(d), "grace": 1, "why": "Hang"}, python="/usr/bin/python3",
                      preexec_fn=as_nobody)  # fmt: skip
        assert killed.one("killed")["gone"] is True  # nothing could have started there
    finally:
        shutil.rmtree(base)


def test_a_state_dir_that_cannot_exist_is_a_configuration_error() -> None:
    # procfs refuses new directories (ENOENT): as much the container's configuration as a read-only disk.
    d = Path("/proc/pythontask/task/a1")
    reply = call(run_request(d), b"pass")
    expect_not_writable(reply, "/proc/pythontask", "No such file or directory", os.getuid())


@needs_namespaces
def test_a_full_state_dir_is_a_configuration_error(tmp_path: Path) -> None:
    mount = tmp_path / "full"
    mount.mkdir()
    d = mount / "task" / "a1"
    wrapper = (
        "unshare",
        "--mount",
        "sh",
        "-c",
        f'mount -t tmpfs -o size=16k tmpfs {mount} && exec "$@"',
        "sh",
    )
    reply = call(run_request(d), b"#" * (1 << 20), prefix=wrapper)
    expect_not_writable(reply, str(d / "script.py"), "No space left on device", 0)


# ---------------------------------------------------------------------------------------------------
# A PID 1 that never reaps (`sleep infinity`, as in many worker pods)


class PidNamespace:
    """A PID namespace (with its own /proc) whose PID 1 is `sleep infinity`, which reaps nothing.
    Agents enter it with nsenter, as a container runtime's exec would: they are not PID 1's children."""

    def __init__(self) -> None:
        self.unshare = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--mount-proc", "sleep", "infinity"], stderr=subprocess.DEVNULL
        )
        children = Path(f"/proc/{self.unshare.pid}/task/{self.unshare.pid}/children")
        self.init = int(eventually(lambda: children.read_text().split(), what="the namespace's PID 1")[0])
        eventually(lambda: len(self.processes()) == 1, what="the namespace to settle")

    def prefix(self) -> tuple[str, ...]:
        return ("nsenter", "-t", str(self.init), "-p", "-m", "--")

    def processes(self) -> list[tuple[int, str, str]]:
        """(pid, state, command) of every process in the namespace but the scanner itself."""
        scan = (
            "import json, os\nme = os.getpid()\nout = []\n"
            "for p in os.listdir('/proc'):\n"
            "    if p.isdigit() and int(p) != me:\n"
            "        try: s = open('/proc/%s/stat' % p).read()\n"
            "        except OSError: continue\n"
            "        out.append((int(p), s[s.rindex(')') + 2], s[s.index('(') + 1 : s.rindex(')')]))\n"
            "print(json.dumps(out))\n"
        )
        done = subprocess.run([*self.prefix(), PYTHON, "-S", "-c", scan], capture_output=True, check=True)
        return [tuple(p) for p in json.loads(done.stdout)]  # type: ignore[misc]

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.init, signal.SIGKILL)  # the whole namespace goes with its PID 1
        self.unshare.wait(30)


@pytest.fixture
def namespace() -> Iterator[PidNamespace]:
    ns = PidNamespace()
    try:
        yield ns
    finally:
        ns.close()


@needs_namespaces
def test_no_zombies_under_a_pid1_that_never_reaps(namespace: PidNamespace, state: Path) -> None:
    attempts = 50
    for i in range(attempts):
        d = state / f"task{i}" / "a1"
        reply = call(run_request(d), b"pass", ack=FORGET_ACK, prefix=namespace.prefix())
        assert reply.types == ["accepted", "started", "caughtUp", "result", "forgotten"], reply.messages
        assert reply.one("result")["result"]["exitCode"] == 0
    assert namespace.processes() == [(1, "S", "sleep")]  # no zombie, nothing left running
    assert list(state.iterdir()) == []


ORPHANS_AND_LEFTOVERS = b"""
import os, subprocess, time
# A grandchild orphaned while the script runs; it exits on its own and must not stay a zombie.
if os.fork() == 0:
    if os.fork() == 0:
        time.sleep(0.2)
        os._exit(0)
    os._exit(0)
os.wait()
subprocess.Popen(["sleep", "1000"])                          # left running in the script's group
subprocess.Popen(["sleep", "1001"], start_new_session=True)  # left running outside it
time.sleep(0.5)
print("done")
"""


@needs_namespaces
def test_orphans_are_reaped_and_leftovers_ended(namespace: PidNamespace, state: Path) -> None:
    d = state / "task" / "a1"
    reply = call(run_request(d), ORPHANS_AND_LEFTOVERS, ack=FORGET_ACK, prefix=namespace.prefix())
    assert reply.one("result")["result"]["exitCode"] == 0
    assert bytes(reply.stdout) == b"done\n"
    assert namespace.processes() == [(1, "S", "sleep")]


@needs_namespaces
def test_the_result_survives_the_run_agents_death(namespace: PidNamespace, state: Path) -> None:
    d = state / "task" / "a1"
    release = state.parent / "release"
    script = (
        f"import os, time\nprint('ready', flush=True)\n"
        f"while not os.path.exists({str(release)!r}): time.sleep(0.01)\nprint('after')\nraise SystemExit(7)\n"
    ).encode()
    runner = Agent(run_request(d), script, prefix=namespace.prefix())
    runner.wait_output(b"ready\n")
    # The nsenter process's child is the agent (in the namespace); the supervisor has its own session.
    children = Path(f"/proc/{runner.proc.pid}/task/{runner.proc.pid}/children")
    os.kill(int(children.read_text().split()[0]), signal.SIGKILL)
    runner.proc.wait(30)
    release.touch()
    eventually((d / "result.json").exists, what="the supervisor's result")
    follow = call({"op": "follow", "dir": str(d), "tail": 100}, ack=FORGET_ACK, prefix=namespace.prefix())
    assert follow.one("result")["result"]["exitCode"] == 7
    assert bytes(follow.stdout) == b"ready\nafter\n"


# ---------------------------------------------------------------------------------------------------
# The loader, on interpreters older than the agent supports


def unsupported(python: str) -> dict[str, Any]:
    done = subprocess.run(
        agent_command([python]),
        input=encode_stdin({"op": "follow", "dir": "/x"}),
        capture_output=True,
        check=False,
    )
    reply = Reply(done.stdout, done.stderr, done.returncode)
    assert not done.stderr
    assert reply.types == ["error"]
    return reply.one("error")


@pytest.mark.parametrize("version", ["2.7", "3.6", "3.7"])
def test_the_loader_names_an_unsupported_interpreter(version: str) -> None:
    python = interpreter(version)
    if python is None:
        pytest.skip(f"no Python {version} on this machine")
    error = unsupported(python)
    assert error["reason"] == "UnsupportedPython"
    assert error["message"] == f"Python {version} at {python}: spec.python must name Python 3.8 or newer"


def run_loader(version: tuple[int, ...], stdin: bytes = b"") -> tuple[bytes, dict[str, Any]]:
    """Runs LOADER with a stub sys and os: what it writes to fd 1, and its globals."""
    written = io.BytesIO()
    fake_sys = types.SimpleNamespace(
        version_info=version,
        executable="/opt/python/bin/python",
        stdin=types.SimpleNamespace(buffer=io.BytesIO(stdin)),
    )
    fake_os = types.SimpleNamespace(write=lambda fd, data: written.write(data) if fd == 1 else 0)
    real_import = __import__

    def fake_import(name: str, *args: Any, **kwargs: Any) -> Any:
        return {"sys": fake_sys, "os": fake_os}.get(name) or real_import(name, *args, **kwargs)

    namespace: dict[str, Any] = {"__builtins__": {**vars(builtins), "__import__": fake_import}}
    exec(LOADER, namespace)
    return written.getvalue(), namespace


def test_the_loaders_version_check_with_a_stub_interpreter() -> None:
    out, _ = run_loader((3, 6, 15, "final", 0))
    kind, size = struct.unpack(">cI", out[:5])
    assert (kind, size) == (b"M", len(out) - 5)
    assert json.loads(out[5:]) == {
        "type": "error",
        "reason": "UnsupportedPython",
        "message": "Python 3.6 at /opt/python/bin/python: spec.python must name Python 3.8 or newer",
    }
    out, namespace = run_loader((3, 8, 0, "final", 0), stdin=b"8\nran = 1\n")
    assert out == b""
    assert namespace["ran"] == 1


def test_the_loader_is_short() -> None:
    assert len(LOADER) < 340


# ---------------------------------------------------------------------------------------------------
# The agent's JSON without the json package


@pytest.mark.parametrize(
    "value", [{"a": [1, 2.5, None, True, False, 'h\u00e9"\\\n'], "b": {}, "c": 1 << 40}, [], "x", 0]
)
def test_json_without_the_json_package(value: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    text = agent_module.to_json(value)
    assert json.loads(text) == value
    assert agent_module.from_json(text) == value
    assert agent_module.from_json(f" {json.dumps(value, indent=1)}\n".encode()) == value
    with pytest.raises(ValueError, match="not JSON"):
        agent_module.from_json(text + "x")
    monkeypatch.setattr(agent_module, "_scan", None)
    monkeypatch.setattr(agent_module, "_encode", None)
    assert agent_module.from_json(agent_module.to_json(value)) == value


def test_a_torn_fate_is_never_taken_for_a_tombstone() -> None:
    assert agent_module.Fate("killed Hang").killed
    assert agent_module.Fate("killed Hang").why == "Hang"
    for text in ("", "run", "kil", "run 12 345"):
        assert not agent_module.Fate(text).killed
    fate = agent_module.Fate("run 12 345")
    assert (fate.supervisor, fate.supervisor_start) == (12, "345")


def _locked(d: Path, pod: str, exclusive: bool, task: str) -> dict[str, Any]:
    return run_request(d, podLock={"pod": pod, "exclusive": exclusive, "task": task})


RELEASED = b"import os, time\nwhile not os.path.exists(os.environ['RELEASE']): time.sleep(0.02)\n"


def test_a_script_that_runs_alone_waits_for_the_pods_other_scripts_and_they_for_it(tmp_path: Path) -> None:
    root = tmp_path / "state"
    release = tmp_path / "release"
    env = {"RELEASE": str(release)}
    first = _locked(root / "t1" / "a1", "pod-1", False, "ns/shared-one")
    running = Agent({**first, "env": env}, RELEASED)
    running.wait_for("started")
    # A task that must run alone: told who holds the pod; nothing claimed, so it may come again.
    alone = root / "t2" / "a1"
    busy = call(_locked(alone, "pod-1", True, "ns/alone"), b"print('never')\n")
    assert busy.types == ["busy"], busy.messages
    assert busy.one("busy")["tasks"] == ["ns/shared-one"]
    assert not alone.exists()
    # Another pod's lock is another lock (kwok pods share this machine's state directory).
    other = call(_locked(root / "t3" / "a1", "pod-2", True, "ns/elsewhere"), b"print('there')\n")
    assert other.types[-1] == "result", other.messages
    # Shared tasks run side by side; then the alone one runs once they have all ended...
    beside = call(_locked(root / "t4" / "a1", "pod-1", False, "ns/shared-two"), b"print('beside')\n")
    assert beside.types[-1] == "result", beside.messages
    release.touch()
    running.wait_for("result")
    running.close()
    holding = Agent({**_locked(alone, "pod-1", True, "ns/alone"), "env": env}, RELEASED)
    holding.wait_for("started")
    # ...and while it runs, a shared one waits for it.
    release.unlink()
    waiting = call(_locked(root / "t5" / "a1", "pod-1", False, "ns/late"), b"print('late')\n")
    assert waiting.one("busy")["tasks"] == ["ns/alone"]
    release.touch()
    holding.wait_for("result")
    holding.close()


def test_the_pod_lock_goes_with_a_killed_supervisor(tmp_path: Path) -> None:
    root = tmp_path / "state"
    d = root / "t1" / "a1"
    holder = Agent(_locked(d, "pod-1", True, "ns/killed"), b"import time\ntime.sleep(600)\n")
    holder.wait_for("started")
    fate = (d / "fate").read_text().split()
    os.kill(int(fate[1]), signal.SIGKILL)  # the supervisor (its script lives on, orphaned, in its group)
    pids = json.loads((d / "pid").read_text())
    os.killpg(pids["pid"], signal.SIGKILL)
    holder.close()
    after = call(_locked(root / "t2" / "a1", "pod-1", True, "ns/next"), b"print('next')\n")
    assert after.types[-1] == "result", after.messages


# ---------------------------------------------------------------------------------------------------
# Retention (spec.output.retain) and the read op (the kubectl plugin's `logs`)


def retain(seconds: float, *, limit: int = 0, run: str = "g1-rrun1") -> dict[str, Any]:
    return {"seconds": seconds, "bytes": limit, "run": run}


def read(d: Path, stream: str = "stdout", follow: bool = False) -> Reply:
    return call({"op": "read", "dir": str(d), "stream": stream, "follow": follow})


def index_of(state: Path) -> list[str]:
    index = state / ".retained"
    return sorted(p.name for p in index.iterdir()) if index.exists() else []


def test_a_retained_attempt_is_kept_and_read_whole_from_its_first_byte(state: Path, reaped: None) -> None:
    d = state / "task" / "g1-rrun1-a1"
    script = b"import sys\nsys.stdout.write('x' * 300000 + 'END')\nsys.stderr.write('oops')\n"
    reply = call(run_request(d, retain=retain(3600)), script, ack=FORGET_ACK)
    assert reply.one("forgotten") == {"type": "forgotten", "removed": 0, "retained": 1, "skipped": 0}
    assert d.is_dir()
    until, run = (d / "retain-until").read_text().split()
    assert run == "g1-rrun1"
    assert abs(int(until) / 1000 - (time.time() + 3600)) < 60
    assert index_of(state) == [f"{int(until):015d}.task.g1-rrun1-a1"]

    out = read(d)
    assert bytes(out.stdout) == b"x" * 300000 + b"END"  # byte-exact, not a tail
    assert not out.stderr
    end = out.one("end")
    assert end["result"]["exitCode"] == 0
    assert end["totals"] == {"stdout": 300003, "stderr": 4}
    assert (end["running"], end["removed"]) == (False, False)
    assert abs(end["retainedUntil"] - int(until) / 1000) < 0.01
    err = read(d, "stderr")
    assert bytes(err.stderr) == b"oops"
    assert not err.stdout

    # A second forget (the janitor, after a lost acknowledgement) keeps the first mark.
    again = call({"op": "forget", "dirs": [str(d)], "tasks": [], "retain": {str(d): retain(5)}})
    assert again.one("forgotten")["retained"] == 1
    assert (d / "retain-until").read_text().split()[0] == until
    # Deleting the task still purges everything, retained output included.
    purged = call({"op": "forget", "dirs": [], "tasks": [str(d.parent)]})
    assert purged.one("forgotten")["removed"] == 1
    assert not d.parent.exists()


def test_the_read_op_writes_nothing_and_says_what_it_cannot_read(state: Path, tmp_path: Path) -> None:
    assert read(state / "task" / "none").types == ["missing"]
    tomb = state / "task" / "tomb"
    call({"op": "kill", "dir": str(tomb), "grace": 1, "why": "Hang"})
    assert read(tomb).types == ["tombstoned"]
    claimed = state / "task" / "claimed"
    claimed.mkdir(parents=True)  # claimed, its fate undecided: a follower would tombstone it, read does not
    assert read(claimed).types == ["notStarted"]
    assert list(claimed.iterdir()) == []
    before = {p: p.stat().st_mtime_ns for p in state.rglob("*")}
    read(tomb)
    assert {p: p.stat().st_mtime_ns for p in state.rglob("*")} == before


def test_read_follow_streams_a_running_script_live_to_its_end(state: Path, tmp_path: Path) -> None:
    d = state / "task" / "a1"
    release = tmp_path / "release"
    script = (
        "import os, sys, time\n"
        "print('first', flush=True)\n"
        f"while not os.path.exists({str(release)!r}):\n"
        "    time.sleep(0.01)\n"
        "print('last', flush=True)\n"
    ).encode()
    runner = Agent(run_request(d), script)
    runner.wait_output(b"first\n")
    snapshot = read(d)  # without follow: what is there now, and that it runs
    assert bytes(snapshot.stdout) == b"first\n"
    assert snapshot.one("end")["running"] is True
    assert snapshot.one("end")["result"] is None

    reader = Agent({"op": "read", "dir": str(d), "stream": "stdout", "follow": True})
    reader.wait_output(b"first\n")  # live: before the script ends
    assert "end" not in reader.types
    release.touch()
    end = reader.wait_for("end")
    assert end["result"]["exitCode"] == 0
    assert bytes(reader.stdout) == b"first\nlast\n"
    assert reader.close() == 0
    runner.wait_for("result")
    assert runner.close() == 0


def test_expired_output_is_reported_and_swept_by_the_next_agent(state: Path, reaped: None) -> None:
    d = state / "task" / "g1-rrun1-a1"
    call(run_request(d, retain=retain(0.3)), b"print('kept a moment')", ack=FORGET_ACK)
    assert read(d).types == ["end"]
    eventually(lambda: read(d).types == ["expired"], within=10, what="the retention to expire")
    assert d.is_dir()  # read writes nothing, not even a sweep
    # Any run, follow or forget sweeps: here another task's run.
    call(run_request(state / "other" / "g1-rrun9-a1"), b"pass", ack=FORGET_ACK)
    assert not d.exists()
    assert not d.parent.exists()
    assert index_of(state) == []


def test_the_sweep_never_removes_a_running_attempt_nor_a_tombstone(state: Path, tmp_path: Path) -> None:
    # Marks made by hand, as a buggy or hostile writer might: retention still removes only what ended.
    running = state / "task" / "running"
    runner = Agent(run_request(running, args=["r"]), MARKED_SLEEPER.format(markers=str(tmp_path)).encode())
    runner.wait_output(b"ready\n")
    tomb = state / "task" / "tomb"
    call({"op": "kill", "dir": str(tomb), "grace": 1, "why": "Hang"})
    (state / ".retained").mkdir()
    for d in (running, tomb):
        (d / "retain-until").write_text("1 g1-r\n")
        (state / ".retained" / f"{1:015d}.task.{d.name}").touch()
    call({"op": "forget", "dirs": [], "tasks": [], "dir": str(state / "x" / "y")})
    call(run_request(state / "other" / "a1"), b"pass")
    assert running.is_dir()
    assert (running / "pid").exists()
    assert (tomb / "fate").read_text().startswith("killed")
    # Neither can be marked by a real forget either: a running script is skipped, a tombstone removed.
    reply = call({"op": "forget", "dirs": [str(running)], "tasks": [], "retain": {str(running): retain(60)}})
    assert reply.one("forgotten")["skipped"] == 1
    call({"op": "kill", "dir": str(running), "grace": 1, "why": "Hang"})
    runner.wait_for("result")
    assert runner.close() == 0


def test_a_tasks_retained_output_stays_within_its_bytes_oldest_first_and_only_its_last_run(
    state: Path, reaped: None
) -> None:
    task = state / "task"

    def attempt(name: str, size: int, run: str = "g1-rrun1") -> Path:
        d = task / name
        reply = call(
            run_request(d, retain=retain(3600, limit=250_000, run=run)),
            f"print('y' * {size - 1})".encode(),
            ack=FORGET_ACK,
        )
        assert reply.one("forgotten")["retained"] == 1
        return d

    a1 = attempt("g1-rrun1-a1", 100_000)
    a2 = attempt("g1-rrun1-a2", 100_000)
    assert a1.is_dir()
    assert a2.is_dir()  # 200,000 bytes: within the bound
    a3 = attempt("g1-rrun1-a3", 100_000)
    assert not a1.exists()  # the oldest went first
    assert a2.is_dir()
    assert a3.is_dir()
    assert len(index_of(state)) == 2
    big = attempt("g1-rrun1-a4", 300_000)  # alone over the bound: it stays, the others go
    assert sorted(p.name for p in task.iterdir()) == [big.name]
    rerun = attempt("g1-rrun2-a1", 10)  # a new run: the last run's output goes at once
    assert sorted(p.name for p in task.iterdir()) == [rerun.name]
    assert index_of(state) == [n for n in index_of(state) if n.endswith(".g1-rrun2-a1")]
    assert len(index_of(state)) == 1


def test_without_retention_forget_removes_as_before(state: Path, reaped: None) -> None:
    d = state / "task" / "a1"
    reply = call(run_request(d, retain=retain(0)), b"print(1)", ack=FORGET_ACK)
    assert reply.one("forgotten") == {"type": "forgotten", "removed": 1, "retained": 0, "skipped": 0}
    assert not d.parent.exists()
