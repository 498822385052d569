# The in-container agent. It is not imported by the operator: its source is sent over the exec
# stdin and run by the container's own Python (3.8+, standard library only).
#
# Framing on our stdout (the exec stdout channel): one byte kind, four bytes big-endian length, payload.
#   b"O" script stdout bytes, b"E" script stderr bytes, b"M" a JSON message.
# Our own stderr is only for the agent's crashes.
#
# Request (second length-prefixed blob on stdin, after this source): JSON
#   {"op": "run" | "follow" | "kill" | "forget", "dir": attempt dir, ...};
#   for "run" a third blob is the script.
#
# Layout of an attempt directory:
#   script.py        the user's script
#   stdout, stderr   everything the script wrote
#   pid              JSON: the script's pid (= its process group) and the supervisor's, with start times
#   result.json      written atomically by the supervisor when the script has ended
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import resource
import shutil
import signal
import struct
import sys
import time
from typing import Any, BinaryIO

OUT = sys.stdout.buffer
IN = sys.stdin.buffer
CHUNK = 64 * 1024
HEARTBEAT_SECONDS = 5.0
# Poll fast while output flows, back off while it does not: a thousand quiet scripts must not
# cost a thousand busy pollers.
POLL_MIN_SECONDS = 0.005
POLL_MAX_SECONDS = 0.2
START_TIMEOUT_SECONDS = 30.0
AGENT_FAILURE = 125
PR_SET_CHILD_SUBREAPER = 36


def send(kind: bytes, payload: bytes) -> None:
    OUT.write(kind + struct.pack(">I", len(payload)) + payload)
    OUT.flush()


def message(**fields: Any) -> None:
    send(b"M", json.dumps(fields, separators=(",", ":")).encode())


def read_blob() -> bytes:
    header = IN.readline()
    if not header:
        raise SystemExit("agent: stdin closed before the request arrived")
    size = int(header)
    data = IN.read(size)
    if len(data) != size:
        raise SystemExit("agent: stdin closed in the middle of the request")
    return data


def proc_start_time(pid: int) -> str | None:
    # Field 22 of /proc/PID/stat; guards against signalling a recycled pid.
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rindex(b")") + 2 :].split()[19].decode()


def read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def read_pids(d: str) -> dict[str, Any] | None:
    return read_json(os.path.join(d, "pid"))


def read_result(d: str) -> dict[str, Any] | None:
    return read_json(os.path.join(d, "result.json"))


def alive(pid: int, start: str | None) -> bool:
    return proc_start_time(pid) == start


def group_alive(pgid: int, start: str | None) -> bool:
    """True while any process of the script's group exists (the leader may exit before its children)."""
    current = proc_start_time(pgid)
    if current is not None and current != start:
        return False  # the pid was recycled by an unrelated process
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_atomic(path: str, data: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)


def read_first_int(*paths: str) -> int | None:
    for path in paths:
        with contextlib.suppress(OSError, ValueError, IndexError), open(path) as f:
            return int(f.read().split()[0])
    return None


def read_keyed(*paths: str) -> dict[str, int]:
    for path in paths:
        with contextlib.suppress(OSError, ValueError), open(path) as f:
            return {k: int(v) for k, v in (line.split()[:2] for line in f if len(line.split()) >= 2)}
    return {}


def cgroup_counters() -> dict[str, int]:
    """The container's cgroup counters (v2, else v1), where readable."""
    counters: dict[str, int] = {}
    peak = read_first_int("/sys/fs/cgroup/memory.peak", "/sys/fs/cgroup/memory/memory.max_usage_in_bytes")
    if peak is not None:
        counters["memoryPeakBytes"] = peak
    events = read_keyed("/sys/fs/cgroup/memory.events", "/sys/fs/cgroup/memory/memory.oom_control")
    if "oom_kill" in events:
        counters["oomKills"] = events["oom_kill"]
    cpu = read_keyed(
        "/sys/fs/cgroup/cpu.stat", "/sys/fs/cgroup/cpu/cpu.stat", "/sys/fs/cgroup/cpu,cpuacct/cpu.stat"
    )
    if "nr_throttled" in cpu:
        counters["throttledPeriods"] = cpu["nr_throttled"]
    if "throttled_usec" in cpu:
        counters["throttledMicros"] = cpu["throttled_usec"]
    elif "throttled_time" in cpu:  # v1: nanoseconds
        counters["throttledMicros"] = cpu["throttled_time"] // 1000
    return counters


def reap_all() -> None:
    while True:
        try:
            reaped, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if reaped == 0:
            return


def end_group(pgid: int, grace: float = 2.0) -> None:
    """Terminates what the script left running in its group, as a container runtime would."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except OSError:
            return
        deadline = time.time() + grace
        while time.time() < deadline:
            reap_all()
            try:
                os.killpg(pgid, 0)
            except OSError:
                return
            time.sleep(0.02)


def exec_script(d: str, argv: list[str], env: dict[str, str], cwd: str | None) -> None:
    """In the forked child: becomes the script, in its own process group, with no stdin."""
    try:
        os.setpgid(0, 0)
        devnull = os.open(os.devnull, os.O_RDONLY)
        out = os.open(os.path.join(d, "stdout"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        err = os.open(os.path.join(d, "stderr"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(devnull, 0)
        os.dup2(out, 1)
        os.dup2(err, 2)
        if cwd:
            os.chdir(cwd)
        os.execvpe(argv[0], argv, env)
    except BaseException as e:
        os.write(2, f"pythontask: cannot start {argv[0]}: {e}\n".encode())
    os._exit(127)


def supervise(d: str, argv: list[str], env: dict[str, str], cwd: str | None) -> None:
    """Runs in the detached supervisor: starts the script, reaps, records the result."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # adopt and reap orphans
    before = cgroup_counters()
    started = time.time()
    pid = os.fork()
    if pid == 0:
        exec_script(d, argv, env, cwd)
    with contextlib.suppress(OSError):
        os.setpgid(pid, pid)  # also from this side, so the group exists before anyone signals it
    me = os.getpid()
    record = {
        "pid": pid,
        "start": proc_start_time(pid),
        "supervisor": me,
        "supervisorStart": proc_start_time(me),
    }
    write_atomic(os.path.join(d, "pid"), json.dumps(record))

    def forward(signum: int, _frame: Any) -> None:
        with contextlib.suppress(OSError):
            os.killpg(pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    status = None
    while status is None:
        try:
            reaped, st = os.wait()
        except ChildProcessError:
            break
        if reaped == pid:
            status = st
    end_group(pid)
    reap_all()
    result: dict[str, Any] = {"startedAt": started, "finishedAt": time.time()}
    if status is None:
        result["error"] = "the script's exit status was lost"
    elif os.WIFSIGNALED(status):
        result["signal"] = os.WTERMSIG(status)
        result["exitCode"] = 128 + os.WTERMSIG(status)
    else:
        result["exitCode"] = os.WEXITSTATUS(status)
    after = cgroup_counters()
    # ru_maxrss of reaped descendants, in KiB on Linux: the script's own peak, whatever the cgroup says.
    peak_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    resources: dict[str, float] = {"scriptPeakRSSBytes": peak_rss}
    if "memoryPeakBytes" in after:
        resources["containerMemoryPeakBytes"] = after["memoryPeakBytes"]
    for key, name in (("oomKills", "oomKills"), ("throttledPeriods", "cpuThrottledPeriods")):
        if key in after:
            resources[name] = after[key] - before.get(key, 0)
    if "throttledMicros" in after:
        resources["cpuThrottledSeconds"] = (after["throttledMicros"] - before.get("throttledMicros", 0)) / 1e6
    result["resources"] = resources
    write_atomic(os.path.join(d, "result.json"), json.dumps(result))


def start(d: str, req: dict[str, Any], script: bytes) -> bool:
    """Creates the attempt directory and launches the detached supervisor. At most once per dir."""
    os.makedirs(os.path.dirname(d), mode=0o700, exist_ok=True)
    try:
        os.mkdir(d, 0o700)
    except FileExistsError:
        return False  # this attempt was started before (operator restart): never run it twice
    path = req.get("scriptPath") or os.path.join(d, "script.py")
    if not req.get("scriptPath"):
        with open(path, "wb") as f:
            f.write(script)
    env = dict(os.environ)
    env.update(req.get("env") or {})
    env["PYTHONUNBUFFERED"] = "1"
    argv = [*req["python"], "-u", path, *(req.get("args") or [])]
    # Double fork: the supervisor must not belong to this exec session, so a dropped stream (or a
    # runtime that kills the session's processes) leaves the script running and its result recorded.
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            try:
                supervise(d, argv, env, req.get("workingDir"))
            finally:
                os._exit(0)
        os._exit(0)
    os.wait()
    return True


def wait_started(d: str) -> bool:
    deadline = time.time() + START_TIMEOUT_SECONDS
    while read_pids(d) is None and read_result(d) is None:
        if time.time() > deadline:
            return False
        time.sleep(0.005)
    return True


def follow(d: str, from_start: bool, tail: int) -> int:
    """Streams the script's output until its result is recorded, then sends the result."""
    if not wait_started(d):
        message(type="error", message=f"the script did not start within {START_TIMEOUT_SECONDS:g}s")
        return AGENT_FAILURE
    pids = read_pids(d) or {}
    message(type="started", pid=pids.get("pid"))
    streams = [(os.path.join(d, "stdout"), b"O"), (os.path.join(d, "stderr"), b"E")]
    opened: list[BinaryIO | None] = [None, None]
    result = None
    last_beat = time.time()
    caught_up = False
    poll = POLL_MIN_SECONDS
    with contextlib.ExitStack() as files:
        while True:
            # Read the result before draining: output written before it was recorded is not missed.
            result = read_result(d)
            moved = False
            for i, (path, kind) in enumerate(streams):
                f = opened[i]
                if f is None:
                    if not os.path.exists(path):
                        continue
                    f = opened[i] = files.enter_context(open(path, "rb"))
                    if not from_start:  # reattaching: resend only the tail
                        f.seek(max(0, os.path.getsize(path) - tail))
                data = f.read(CHUNK)
                while data:
                    moved = True
                    send(kind, data)
                    data = f.read(CHUNK)
            if not caught_up:
                # What was already on disk has been sent (on a reattach: the replayed tail).
                message(type="caughtUp")
                caught_up = True
            if result is not None:
                break
            supervisor_dead = pids and not alive(pids["supervisor"], pids["supervisorStart"])
            if supervisor_dead and read_result(d) is None and not group_alive(pids["pid"], pids["start"]):
                # The supervisor was killed (e.g. by the OOM killer): nobody will record the status.
                result = {"error": "the script's supervisor died, so its exit status is unknown"}
                break
            now = time.time()
            if now - last_beat >= HEARTBEAT_SECONDS:
                message(type="heartbeat")
                last_beat = now
            if moved:
                poll = POLL_MIN_SECONDS
            else:
                time.sleep(poll)
                poll = min(POLL_MAX_SECONDS, poll * 1.5)
    totals = {
        name: os.path.getsize(path) if os.path.exists(path) else 0
        for (path, _), name in zip(streams, ("stdout", "stderr"))
    }
    message(type="result", result=result, totals=totals)
    code = result.get("exitCode")
    return code if isinstance(code, int) else AGENT_FAILURE


def kill(d: str, grace: float) -> int:
    pids = read_pids(d)
    if pids is None or not group_alive(pids["pid"], pids["start"]):
        message(type="killed", wasRunning=False, gone=True)
        return 0
    pgid, start_time = pids["pid"], pids["start"]
    forced = False
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        if sig == signal.SIGKILL:
            forced = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
        deadline = time.time() + wait
        while time.time() < deadline and group_alive(pgid, start_time):
            time.sleep(0.02)
        if not group_alive(pgid, start_time):
            break
    message(type="killed", wasRunning=True, forced=forced, gone=not group_alive(pgid, start_time))
    return 0


def forget(dirs: list[str]) -> int:
    """Removes attempt directories whose results are recorded (never a whole task: a rerun's fresh
    attempt may already be starting beside them)."""
    removed = 0
    for d in dirs:
        if os.path.isdir(d):
            shutil.rmtree(d, ignore_errors=True)
            removed += 1
    message(type="forgotten", removed=removed)
    return 0


def main() -> int:
    req = json.loads(read_blob())
    op, d = req["op"], req.get("dir", "")
    tail = int(req.get("tail", 65536))
    if op == "run":
        script = read_blob()
        path = req.get("scriptPath")
        if path and not os.path.isdir(d) and not os.path.isfile(path):
            message(type="error", reason="ScriptNotFound", message=f"{path} is not a file in the container")
            return AGENT_FAILURE
        fresh = start(d, req, script)
        message(type="accepted", fresh=fresh)
        return follow(d, fresh, tail)
    if op == "follow":
        if not os.path.isdir(d):
            message(type="missing")
            return 0
        return follow(d, False, tail)
    if op == "kill":
        return kill(d, float(req.get("grace", 5)))
    if op == "forget":
        return forget(req.get("dirs") or [d])
    message(type="error", message=f"unknown op {op!r}")
    return AGENT_FAILURE


sys.exit(main())
