# The in-container agent, protocol v2. The operator never imports it: its source travels over the exec
# stdin, after the LOADER (agent_protocol.py) checked the interpreter, and the container's own Python
# (3.8+, standard library only) runs it as `python -S -u -c LOADER`.
#
# Stdin: length-prefixed blobs (ASCII length, "\n", bytes): this source (read by the LOADER), a JSON
# request, and for "run" the script. D is <stateDir>/<taskUID>/<attemptID>; T a task directory.
#   {"op": "run", "dir": D, "tail": N, "python": [...], "args": [...], "env": {...},
#    "workingDir": str|null, "scriptPath": str|null, "maxOutputBytes": int, "mask": [str, ...],
#    "podLock": {"pod": uid, "exclusive": bool, "task": "ns/name"} | null, "retain": R?}
#   {"op": "follow", "dir": D, "tail": N, "retain": R?}
#   {"op": "kill", "dir": D, "grace": seconds, "why": str}
#   {"op": "forget", "dirs": [D, ...], "tasks": [T, ...], "retain": {D: R, ...}?}
#   {"op": "read", "dir": D, "stream": "stdout"|"stderr", "follow": bool}
#   R = {"seconds": S, "bytes": B, "run": str}: how long a forgotten D's output is kept (retained),
#   the most output bytes a task's retained Ds may hold together (0: no bound), and D's run (the
#   attempt id without its "-a<N>"): retained Ds of other runs of the task go at once.
# After a `result`, a run or follow agent reads one more line (heartbeating meanwhile, at most
# ACK_TIMEOUT_SECONDS): "forget" forgets D (below) and answers `forgotten`; EOF or anything else leaves
# the files. The operator sends it once the result is in its status. Forgetting D removes it (and T if
# now empty), unless R says to retain it: then D's script must have run and ended, and D stays, marked
# retained until now + S (the container's clock), for `read`; see "Retention" below.
# `read` is the one op that writes nothing (the kubectl plugin runs it with the user's rights): it sends
# D's whole stdout or stderr from its first byte and, with follow, what comes until the script ends.
#
# Stdout (the exec's stdout channel): frames of one byte kind, four bytes big-endian length, payload.
#   b"O" script stdout bytes, b"E" script stderr bytes, b"M" a JSON message {"type": ..., ...}:
#   error {reason?, message}   with a reason a configuration error: StateDirNotWritable, ScriptNotFound
#                              (UnsupportedPython comes from the LOADER); without one, the agent failed
#   accepted {fresh}           run claimed D (fresh), or D was claimed before (then it is followed)
#   busy {tasks}               run with podLock: the pod's lock is held (exclusive by a task that runs
#                              alone, or shared while one is wanted exclusive): nothing was claimed or
#                              started; tasks names what holds it
#   tombstoned {}              killed before its script started: it never ran and never will (may come
#                              after `accepted`)
#   started {pid, mask}        the script runs or ran; mask: the secret values the run recorded
#   caughtUp {}                what was on disk has been sent (on a follow: the last `tail` bytes)
#   heartbeat {}               at least every HEARTBEAT_SECONDS while following or waiting
#   result {result, totals}    the content of result.json, and the byte totals {stdout, stderr}
#   missing {}                 follow, read: no such D
#   killed {wasRunning, gone, forced, tombstoned}
#   forgotten {removed, retained, skipped, skippedDirs}    counts of attempt dirs, and the skipped ones
#   expired {at}               read: D was retained until `at` (epoch seconds), which has passed
#   notStarted {}              read: D is claimed, its script not started (yet)
#   end {result, totals, running, removed, retainedUntil}    read: all of the stream was sent (up to
#                              now, without follow); result null while it runs; removed: D went while
#                              being read (forgotten after its result: what was written was all sent)
# Our own stderr stays empty: every failure is reported as an `error` message.
#
# Layout of an attempt directory D:
#   fate          decided once: created by linking a temp file (EEXIST means someone decided first).
#                 "run <supervisor pid> <its start time>" by the supervisor right before it forks the
#                 script; "killed <why>" by a kill op (or by forget, or by a follower giving up on a
#                 claim nobody decided), a tombstone: the script can never start afterwards. Not
#                 fsynced: a fate torn by a crash reads as "run", never as a tombstone
#   script.py     the inline script (absent with scriptPath)
#   mask.json     the secret values to mask in the output (mode 0600)
#   task          JSON {task, pod}: who claimed D (with podLock), to name it to a task kept waiting
#   stdout, stderr  everything the script wrote (its own fds, appending)
#   pid           JSON: the script's pid (= its process group) and the supervisor's, with start times
#   killed        JSON {why}: written by a kill op before it signals the script
#   result.json   written atomically by the supervisor once the script has ended: exitCode (128+N for
#                 signal N), signal, startedAt, finishedAt, resources, oomKilled, killedBy {why, at},
#                 outputLimitExceeded; or {error} if the exit status was lost
#   retain-until  "<epoch milliseconds> <run>": D was forgotten and is kept until then (retained)
#
# Retention: a retained D has an entry <stateDir>/.retained/<until ms, 15 digits>.<task>.<attempt>
# (made before D's mark, so a mark always has an entry); names sort by expiry. Every run, follow and
# forget agent then removes expired retained Ds (at most SWEEP_LIMIT, oldest first: one listdir and a
# few unlinks). When D is retained, the task's other retained Ds of other runs go, and the oldest of its
# run go while their stdout+stderr, with D's, exceed R's bytes. Only a marked D whose script cannot be
# running is ever removed by retention; a tombstone or a D without a result is never marked.
#
# Processes: a run agent forks the supervisor once. The supervisor calls setsid (a dropped exec session or
# a signal to the agent's group does not reach it), becomes a child subreaper, forks the script in its own
# process group (stdin /dev/null, stdout and stderr appended to D's files), reaps it and every orphan it
# adopts, forwards SIGTERM and SIGINT to the script's group, bounds the output, ends what the script left
# behind (its group, and adopted orphans that left it), writes result.json (fsynced) and exits. The agent
# reaps the supervisor even when its exec stream is gone, so nothing is left for a PID 1 that never
# reaps; only if the agent itself is killed is the supervisor (which still records the result) left to
# PID 1. Followers (the follow op, a run that found D claimed) only read files.
#
# Guarantees:
#   - a script starts at most once per D (mkdir claims D, the fate is decided once), and a kill before
#     the start is final;
#   - a run agent older than START_WINDOW_SECONDS claims nothing (the operator has moved on);
#   - stdout + stderr stay within maxOutputBytes, give or take one poll interval of output (polls come
#     at least every POLL_MAX_SECONDS, and often enough that FLOOD_BYTES_PER_SECOND cannot cross it);
#   - forget never removes an attempt whose script may still be running, and neither does retention;
#   - read writes nothing;
#   - with podLock, a script that must run alone in its pod never runs beside another locked one: the
#     supervisor holds <stateDir>/.pod-<uid>.lock (flock, exclusive or shared) from before D is claimed
#     until the script has ended; the kernel drops it with the supervisor, whatever kills it.
#
# Test-only overrides (environment, seconds): PYTHONTASK_AGENT_HEARTBEAT, PYTHONTASK_AGENT_START_WINDOW,
# PYTHONTASK_AGENT_ACK_TIMEOUT, PYTHONTASK_AGENT_DECIDE_TIMEOUT.
from __future__ import annotations

import errno
import os
import resource
import select
import struct
import sys
import time

# Imports cost milliseconds on every exec, and a task takes a few tens: `typing` is for the type checker
# only, and `signal` and `json` wrap C modules in Python layers that import re and enum.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal
    from typing import Any, BinaryIO
else:
    try:
        import _signal as signal
    except ImportError:
        import signal


def _seconds(name: str, default: float) -> float:
    try:
        return float(os.environ[name])
    except (KeyError, ValueError):
        return default


HEARTBEAT_SECONDS = _seconds("PYTHONTASK_AGENT_HEARTBEAT", 5.0)
START_WINDOW_SECONDS = _seconds("PYTHONTASK_AGENT_START_WINDOW", 60.0)
ACK_TIMEOUT_SECONDS = _seconds("PYTHONTASK_AGENT_ACK_TIMEOUT", 120.0)
# How long a claimed D may wait for its fate, and a "run" fate for its pid file.
DECIDE_TIMEOUT_SECONDS = _seconds("PYTHONTASK_AGENT_DECIDE_TIMEOUT", 30.0)
# A write to the exec stream blocked this long: nobody reads it any more.
STALL_SECONDS = 30.0
# Poll fast while output flows, back off while it does not: a thousand quiet scripts must not
# cost a thousand busy pollers.
POLL_MIN_SECONDS = 0.005
POLL_MAX_SECONDS = 0.2
OUTPUT_LIMIT_GRACE_SECONDS = 2.0
# The output rate the size polls assume at most: past the limit by at most one poll interval of it.
FLOOD_BYTES_PER_SECOND = 512 << 20
LEFTOVER_GRACE_SECONDS = 2.0
KILL_FORCED_WAIT_SECONDS = 10.0
CHUNK = 64 * 1024
PR_SET_CHILD_SUBREAPER = 36
NOT_WRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR}
RETAIN_MARK = "retain-until"
RETAINED_INDEX = ".retained"
SWEEP_LIMIT = 32  # expired retained attempt dirs removed by one agent, at most


def _no_default(value: object) -> Any:
    raise TypeError(f"{value!r} is not JSON serializable")


_scan: Any = None
_encode: Any = None
try:
    import _json

    class _Decoding:  # what the C scanner reads from a json.JSONDecoder
        strict = True
        object_hook = object_pairs_hook = array_hook = None
        parse_float = parse_constant = float
        parse_int = int

    _scan = _json.make_scanner(_Decoding())  # type: ignore[arg-type]
    _encode = _json.make_encoder(
        None, _no_default, _json.encode_basestring_ascii, None, ":", ",", False, False, True
    )
except Exception:  # not CPython, or a C core that changed: the json package then
    _scan = _encode = None


def from_json(data: str | bytes) -> Any:
    text = (data.decode() if isinstance(data, bytes) else data).strip()
    if _scan is None:
        import json  # noqa: PLC0415 - only where the C core is missing

        return json.loads(text)
    try:
        value, end = _scan(text, 0)
    except StopIteration:
        raise ValueError(f"not JSON: {text[:40]!r}") from None
    if end != len(text):
        raise ValueError(f"not JSON: extra data after {text[:40]!r}")
    return value


def to_json(value: Any) -> str:
    if _encode is None:
        import json  # noqa: PLC0415 - only where the C core is missing

        return json.dumps(value, separators=(",", ":"))
    return "".join(_encode(value, 0))


class ignoring:
    """contextlib.suppress, which would cost an import on every exec."""

    def __init__(self, *kinds: type[BaseException]) -> None:
        self.kinds = kinds

    def __enter__(self) -> None:
        pass

    def __exit__(self, kind: type[BaseException] | None, value: object, tb: object) -> bool:
        return kind is not None and issubclass(kind, self.kinds)


class Failure(Exception):
    """Reported as an `error` message; with a reason it is a final configuration error."""

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason


# ---------------------------------------------------------------------------------------------------
# The exec stream


class Channel:
    """Frames on our stdout. When the exec stream goes away (EPIPE, or a write blocked for
    STALL_SECONDS) it stops sending for good and the agent carries on: it still has to reap."""

    def __init__(self, fd: int = 1) -> None:
        self.fd = fd
        self.open = True
        self.last_beat = time.monotonic()
        with ignoring(OSError):
            os.set_blocking(fd, False)  # so a reader that vanished cannot block us forever

    def send(self, kind: bytes, payload: bytes) -> None:
        if not self.open:
            return
        data = memoryview(kind + struct.pack(">I", len(payload)) + payload)
        stalled_since = None
        while data:
            try:
                data = data[os.write(self.fd, data) :]
                stalled_since = None
                continue
            except BlockingIOError:
                pass
            except OSError:  # EPIPE and the like: the stream is gone
                self.open = False
                return
            now = time.monotonic()
            stalled_since = stalled_since or now
            if now - stalled_since >= STALL_SECONDS:
                self.open = False  # a frame may be cut: nothing more may follow it
                return
            try:
                select.select([], [self.fd], [], STALL_SECONDS)
            except OSError:
                self.open = False
                return

    def message(self, name: str, **fields: Any) -> None:
        fields["type"] = name
        self.send(b"M", to_json(fields).encode())

    def until_beat(self) -> float:
        return max(0.0, self.last_beat + HEARTBEAT_SECONDS - time.monotonic())

    def beat(self) -> None:
        if self.until_beat() <= 0.001:
            self.message("heartbeat")
            self.last_beat = time.monotonic()

    def pause(self, seconds: float) -> None:
        """Sleeps, but never past the next heartbeat."""
        time.sleep(min(seconds, self.until_beat() + 0.001))
        self.beat()


def read_blob(stdin: BinaryIO) -> bytes:
    header = stdin.readline(32)
    if not header.endswith(b"\n"):
        raise Failure("stdin closed before the request arrived")
    size = int(header)
    data = stdin.read(size)
    if len(data) != size:
        raise Failure("stdin closed in the middle of the request")
    return data


def read_ack(ch: Channel, stdin: BinaryIO, timeout: float) -> bytes:
    """One line from stdin within `timeout`, heartbeating meanwhile; b"" on timeout. The same buffered
    reader as the request's (it may hold the line already), made non-blocking: b"" from it means
    "nothing yet", or EOF when select just said the fd is readable."""
    try:
        os.set_blocking(stdin.fileno(), False)
    except (OSError, ValueError):
        return b""
    line = b""
    deadline = time.monotonic() + timeout
    readable = False
    while ch.open:
        try:
            chunk = stdin.readline(64 - len(line)) or b""
        except BlockingIOError:
            chunk = b""
        except (OSError, ValueError):
            return line
        if not chunk and readable:
            return line  # EOF
        line += chunk
        if line.endswith(b"\n") or len(line) >= 64:
            return line
        left = deadline - time.monotonic()
        if left <= 0:
            return b""
        readable = bool(select.select([stdin], [], [], min(left, ch.until_beat() + 0.001))[0])
        ch.beat()
    return b""


# ---------------------------------------------------------------------------------------------------
# Files and processes


def read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except (OSError, ValueError):
        return None


def read_json(path: str) -> Any:
    text = read_text(path)
    if text is None:
        return None
    try:
        return from_json(text)
    except ValueError:
        return None


def write_atomic(path: str, data: str, sync: bool = False) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(data)
        if sync:
            f.flush()
            os.fsync(f.fileno())
    os.rename(tmp, path)


def write_new(path: str, data: bytes, mode: int = 0o600) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            while data:
                data = data[os.write(fd, data) :]
        finally:
            os.close(fd)
    except OSError as e:
        e.filename = e.filename or path  # os.write's errors (ENOSPC) name no file
        raise


def proc_stat(pid: int | str) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name: [0] state, [1] ppid, [2] pgrp,
    [19] start time (clock ticks since boot), which tells a process from a recycled pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rindex(b")") + 2 :].decode().split()


def start_time(pid: int) -> str | None:
    stat = proc_stat(pid)
    return stat[19] if stat else None


def alive(pid: int | None, start: str | None) -> bool:
    """The very process recorded (not a recycled pid), and not a zombie."""
    if not pid:
        return False
    stat = proc_stat(pid)
    return stat is not None and stat[0] not in "ZX" and stat[19] == start


def group_alive(pgid: int, start: str | None) -> bool:
    """True while a live process of the script's group exists (its leader may have gone first)."""
    stat = proc_stat(pgid)
    if stat is not None and stat[19] != start:
        return False  # a pid is not reused while its group exists: the group is gone
    if stat is not None and stat[0] not in "ZX":
        return True
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except OSError:
            pass
        return True
    for p in pids:
        member = proc_stat(p)
        if member is not None and member[2] == str(pgid) and member[0] not in "ZX":
            return True
    return False


def process_age() -> float | None:
    """Seconds since this process started, from /proc (None where /proc cannot tell)."""
    stat = proc_stat("self")
    uptime = read_text("/proc/uptime")
    if stat is None or not uptime:
        return None
    try:
        return float(uptime.split()[0]) - int(stat[19]) / os.sysconf("SC_CLK_TCK")
    except (ValueError, OSError):
        return None


def read_first_int(*paths: str) -> int | None:
    for path in paths:
        text = read_text(path)
        if text:
            try:
                return int(text.split()[0])
            except ValueError:
                pass
    return None


def read_keyed(*paths: str) -> dict[str, int]:
    for path in paths:
        text = read_text(path)
        if text is not None:
            keyed = {}
            for line in text.splitlines():
                parts = line.split()
                if len(parts) >= 2 and parts[1].isdigit():
                    keyed[parts[0]] = int(parts[1])
            return keyed
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


# ---------------------------------------------------------------------------------------------------
# The attempt directory


class Fate:
    """What D/fate says. Anything but a readable "killed" counts as "run": a fate torn by a crash may
    hide a script that ran, so it is never taken for a tombstone."""

    def __init__(self, text: str) -> None:
        words = text.split(None, 1)
        self.killed = bool(words) and words[0] == "killed"
        self.why = words[1].strip() if self.killed and len(words) > 1 else ""
        self.supervisor: int | None = None
        self.supervisor_start: str | None = None
        parts = text.split()
        if not self.killed and len(parts) == 3 and parts[1].isdigit():
            self.supervisor, self.supervisor_start = int(parts[1]), parts[2]

    def supervisor_alive(self) -> bool:
        return alive(self.supervisor, self.supervisor_start)


def read_fate(d: str) -> Fate | None:
    try:
        with open(os.path.join(d, "fate")) as f:
            return Fate(f.read())
    except FileNotFoundError:
        # An attempt started by an agent older than the fate file (an operator upgraded while it ran)
        # has a pid record or a result but no fate: it ran.
        pids = read_pids(d)
        if pids is not None:
            return Fate(f"run {pids.get('supervisor')} {pids.get('supervisorStart')}")
        if os.path.exists(os.path.join(d, "result.json")):
            return Fate("run")
        return None
    except (OSError, ValueError):
        return Fate("")  # there, but unreadable: it may have run


def decide(d: str, fate: str) -> bool:
    """Records D's fate unless it was decided before. Linking is atomic and exclusive: of a kill and a
    supervisor racing, exactly one wins, and the content is complete before the name exists."""
    # Unique even across pid namespaces sharing the volume: a shared temp file could be rewritten by
    # the other side between our write and our link.
    tmp = os.path.join(d, f".fate.{os.getpid()}.{os.urandom(6).hex()}")
    write_new(tmp, fate.encode())
    try:
        os.link(tmp, os.path.join(d, "fate"))
        return True
    except FileExistsError:
        return False
    finally:
        with ignoring(OSError):
            os.unlink(tmp)


def settle(d: str, why: str) -> Fate | None:
    """D's fate; if undecided, decides it: killed (a tombstone). None if D is gone."""
    fate = read_fate(d)
    if fate is not None:
        return fate
    try:
        decided = decide(d, "killed " + why)
    except OSError:
        return None if not os.path.isdir(d) else Fate("")
    return Fate("killed " + why) if decided else read_fate(d)


def read_pids(d: str) -> dict[str, Any] | None:
    pids = read_json(os.path.join(d, "pid"))
    return pids if isinstance(pids, dict) else None


def read_result(d: str) -> dict[str, Any] | None:
    result = read_json(os.path.join(d, "result.json"))
    return result if isinstance(result, dict) else None


def may_be_running(d: str, fate: Fate) -> bool:
    if fate.killed or os.path.exists(os.path.join(d, "result.json")):
        return False
    if fate.supervisor_alive():
        return True
    pids = read_pids(d)
    return pids is not None and group_alive(pids["pid"], pids.get("start"))


def not_writable(e: OSError, path: str, d: str) -> Failure:
    """Any failure to make or write the state directory is the container's configuration, never a reason
    to retry elsewhere or restart the pod (a read-only or full filesystem, a path under /proc, ...)."""
    state_dir = os.path.dirname(os.path.dirname(d.rstrip("/"))) or "/"
    what = "is not writable" if e.errno in NOT_WRITABLE else "cannot be created"
    return Failure(
        f"The state directory {what}: {path}: {e.strerror or os.strerror(e.errno or 0)} "
        f"(container user id {os.getuid()}). Mount a writable volume (an emptyDir) at {state_dir} or "
        "set the operator's PYTHONTASK_STATE_DIR to a writable path.",
        "StateDirNotWritable",
    )


# ---------------------------------------------------------------------------------------------------
# The supervisor (a forked child of the run agent) and the script


class Run:
    def __init__(self, d: str, req: dict[str, Any]) -> None:
        self.dir = d
        self.path = req.get("scriptPath") or os.path.join(d, "script.py")
        self.argv = [*req["python"], "-u", self.path, *(req.get("args") or [])]
        self.env = dict(os.environ)
        self.env.update(req.get("env") or {})
        self.env["PYTHONUNBUFFERED"] = "1"
        self.cwd: str | None = req.get("workingDir") or None
        self.max_output = int(req.get("maxOutputBytes") or 0)  # 0: unbounded
        self.mask = [str(m) for m in req.get("mask") or []]


WAITED = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT}


def spawn_supervisor(run: Run) -> tuple[int, int]:
    """Forks the supervisor; returns its pid and a pipe it signals on (a byte once the script started,
    EOF when it exits)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(r)
            os.setsid()
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):  # nothing of ours may hold the exec's stream open
                os.dup2(null, fd)
            supervise(run, w)
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    return pid, r


def supervise(run: Run, notify: int) -> None:
    d = run.dir
    try:
        import ctypes  # noqa: PLC0415 - the supervisor's alone: a millisecond for every other exec

        ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # the script's orphans are ours
    except Exception:
        pass
    signal.pthread_sigmask(signal.SIG_BLOCK, WAITED)  # taken with sigtimedwait, handlers race
    me = os.getpid()
    if not decide(d, f"run {me} {start_time(me)}"):
        return  # killed before the start: the script never runs
    try:
        result = run_script(run, notify)
    except Exception as e:
        result = {"error": f"the supervisor failed: {type(e).__name__}: {e}"}
    write_atomic(os.path.join(d, "result.json"), to_json(result), sync=True)


def run_script(run: Run, notify: int) -> dict[str, Any]:
    d = run.dir
    append = os.O_WRONLY | os.O_CREAT | os.O_APPEND
    out = os.open(os.path.join(d, "stdout"), append, 0o600)
    err = os.open(os.path.join(d, "stderr"), append, 0o600)
    before = cgroup_counters()
    started = time.time()
    pid = os.fork()
    if pid == 0:
        exec_script(run, out, err)
    with ignoring(OSError):
        os.setpgid(pid, pid)  # also from this side: the group exists before anyone can signal it
    me = os.getpid()
    record = {"pid": pid, "start": start_time(pid), "supervisor": me, "supervisorStart": start_time(me)}
    with ignoring(OSError):  # the script runs all the same; it must still be waited for
        write_atomic(os.path.join(d, "pid"), to_json(record))
        os.write(notify, b"s")
    status, limited = wait_script(pid, out, err, run.max_output)
    finished = time.time()
    killed_by = read_json(os.path.join(d, "killed"))  # the kill op writes it before it signals
    end_leftovers(pid)
    after = cgroup_counters()
    result: dict[str, Any] = {"startedAt": started, "finishedAt": finished}
    if os.WIFSIGNALED(status):
        result["signal"] = os.WTERMSIG(status)
        result["exitCode"] = 128 + os.WTERMSIG(status)
    else:
        result["exitCode"] = os.WEXITSTATUS(status)
    if isinstance(killed_by, dict):
        result["killedBy"] = {"why": str(killed_by.get("why", "")), "at": killed_by.get("at")}
    if limited:
        result["outputLimitExceeded"] = True
    oom_kills = after.get("oomKills", 0) - before.get("oomKills", 0)
    result["oomKilled"] = (
        result.get("signal") == signal.SIGKILL and oom_kills > 0 and not killed_by and not limited
    )
    # ru_maxrss of reaped descendants, in KiB on Linux: the script's own peak, whatever the cgroup says.
    resources: dict[str, float] = {
        "scriptPeakRSSBytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    }
    if "memoryPeakBytes" in after:
        resources["containerMemoryPeakBytes"] = after["memoryPeakBytes"]
    for key, name in (("oomKills", "oomKills"), ("throttledPeriods", "cpuThrottledPeriods")):
        if key in after:
            resources[name] = after[key] - before.get(key, 0)
    if "throttledMicros" in after:
        resources["cpuThrottledSeconds"] = (after["throttledMicros"] - before.get("throttledMicros", 0)) / 1e6
    result["resources"] = resources
    return result


def exec_script(run: Run, out: int, err: int) -> None:
    """In the forked child: becomes the script, in its own process group, with no stdin."""
    try:
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        for sig in (signal.SIGPIPE, signal.SIGXFSZ):  # Python ignores these; the script starts afresh
            signal.signal(sig, signal.SIG_DFL)
        os.setpgid(0, 0)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(out, 1)
        os.dup2(err, 2)
        if run.cwd:
            os.chdir(run.cwd)
        os.execvpe(run.argv[0], run.argv, run.env)
    except BaseException as e:
        os.write(2, f"pythontask: cannot start {run.argv[0]}: {e}\n".encode())
    os._exit(127)


def reap(script: int) -> int | None:
    """Reaps every child that has exited (the script, adopted orphans); the script's status if it did."""
    status = None
    while True:
        try:
            pid, st = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return status
        if pid == 0:
            return status
        if pid == script:
            status = st


def wait_script(pid: int, out: int, err: int, max_output: int) -> tuple[int, bool]:
    """Waits for the script, forwarding SIGTERM and SIGINT to its group and bounding its output;
    returns its wait status and whether the output limit killed it."""
    poll = POLL_MIN_SECONDS
    size = 0
    limited_at = limited_size = None
    while True:
        info = signal.sigtimedwait(WAITED, poll if max_output else 60.0)
        if info is not None and info.si_signo != signal.SIGCHLD:
            with ignoring(OSError):
                os.killpg(pid, info.si_signo)
        status = reap(pid)
        if status is not None:
            return status, limited_at is not None
        if not max_output:
            continue
        grown = os.fstat(out).st_size + os.fstat(err).st_size
        poll = POLL_MIN_SECONDS if grown != size else min(POLL_MAX_SECONDS, poll * 1.5)
        size = grown
        # Back off only as far as a sudden flood could not cross the limit meanwhile.
        poll = max(POLL_MIN_SECONDS, min(poll, (max_output - size) / FLOOD_BYTES_PER_SECOND))
        if size > max_output:
            now = time.monotonic()
            if limited_at is None or limited_size is None:
                limited_at, limited_size = now, size
                sig = signal.SIGTERM
            elif now - limited_at >= OUTPUT_LIMIT_GRACE_SECONDS or size - limited_size > CHUNK:
                sig = signal.SIGKILL  # it goes on writing: no more grace
            else:
                continue
            with ignoring(OSError):
                os.killpg(pid, sig)


def own_children() -> list[int]:
    me = str(os.getpid())
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return []
    return [p for p in pids if (proc_stat(p) or ["", ""])[1] == me]


def has_children() -> bool:
    try:
        os.waitpid(-1, os.WNOHANG)  # reaps one that just exited, if any: the caller looks again
    except ChildProcessError:
        return False
    return True


def end_leftovers(pgid: int) -> None:
    """Ends what the script left running, as a container runtime would: its process group, and the
    orphans we adopted (children that left the group). SIGTERM, then SIGKILL."""
    for sig, grace in ((signal.SIGTERM, LEFTOVER_GRACE_SECONDS), (signal.SIGKILL, KILL_FORCED_WAIT_SECONDS)):
        with ignoring(OSError):
            os.killpg(pgid, sig)
        signalled: set[int] = set()
        deadline = time.monotonic() + grace
        while True:
            reap(0)
            try:
                os.killpg(pgid, 0)
                group = True
            except OSError:
                group = False
            children = has_children()
            if not group and not children:
                return
            if children:
                for child in own_children():  # adopted since the last look too
                    if child not in signalled:
                        signalled.add(child)
                        with ignoring(OSError):
                            os.kill(child, sig)
            left = deadline - time.monotonic()
            if left <= 0:
                break
            signal.sigtimedwait({signal.SIGCHLD}, min(left, 0.05))


# ---------------------------------------------------------------------------------------------------
# Following an attempt


class Supervisor:
    """A run agent's own supervisor (main reaps it before exiting, whatever happened, so that it is
    never left to a PID 1 that may not reap): its pipe wakes us when the script started and when it exits."""

    def __init__(self, pid: int, pipe: int) -> None:
        self.pid = pid
        self.pipe: int | None = pipe
        self.reaped = False

    def exited(self) -> bool:
        return self.pipe is None

    def wait(self, ch: Channel, seconds: float) -> None:
        seconds = min(seconds, ch.until_beat() + 0.001)
        if self.pipe is None:
            time.sleep(seconds)
        elif select.select([self.pipe], [], [], seconds)[0] and not os.read(self.pipe, 64):
            os.close(self.pipe)  # EOF: it has exited
            self.pipe = None
        ch.beat()

    def reap(self) -> None:
        if not self.reaped:
            with ignoring(ChildProcessError):
                os.waitpid(self.pid, 0)
            self.reaped = True


SUPERVISORS: list[Supervisor] = []


def pause(ch: Channel, sup: Supervisor | None, seconds: float) -> None:
    if sup is not None:
        sup.wait(ch, seconds)
    else:
        ch.pause(seconds)


def supervisor_gone(fate: Fate, sup: Supervisor | None) -> bool:
    return sup.exited() if sup is not None else not fate.supervisor_alive()


class Stream:
    def __init__(self, path: str, kind: bytes) -> None:
        self.path, self.kind = path, kind
        self.file: BinaryIO | None = None

    def drain(self, ch: Channel, replay: int | None) -> bool:
        """Sends what is new; `replay`: on first opening, send only that many last bytes."""
        if self.file is None:
            try:
                self.file = open(self.path, "rb")  # noqa: SIM115 - kept open across polls, closed by close()
            except FileNotFoundError:
                return False
            if replay is not None:
                self.file.seek(max(0, os.fstat(self.file.fileno()).st_size - replay))
        moved = False
        data = self.file.read(CHUNK)
        while data and ch.open:
            moved = True
            ch.send(self.kind, data)
            data = self.file.read(CHUNK)
        return moved

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def follow(ch: Channel, d: str, replay: int | None, sup: Supervisor | None = None) -> bool:
    """Follows D to its result and sends it (True), or answers `tombstoned` (False).
    `replay`: send only the last that many bytes already written (None: everything)."""
    poll = POLL_MIN_SECONDS
    deadline = time.monotonic() + DECIDE_TIMEOUT_SECONDS
    fate = read_fate(d)
    while fate is None:
        if (sup is not None and sup.exited()) or time.monotonic() > deadline:
            # Claimed, but whoever claimed it is gone without a decision: make sure it never starts.
            fate = settle(d, "abandoned before its start")
            break
        pause(ch, sup, poll)
        poll = min(POLL_MAX_SECONDS, poll * 1.5)
        fate = read_fate(d)
    if fate is None or fate.killed:
        ch.message("tombstoned")
        return False

    pids = read_pids(d)
    while pids is None and not os.path.exists(os.path.join(d, "result.json")):
        if supervisor_gone(fate, sup) or time.monotonic() > deadline:
            break
        pause(ch, sup, poll)
        poll = min(POLL_MAX_SECONDS, poll * 1.5)
        pids = read_pids(d)
    mask = read_json(os.path.join(d, "mask.json"))
    ch.message("started", pid=pids.get("pid") if pids else None, mask=mask if isinstance(mask, list) else [])

    streams = [Stream(os.path.join(d, "stdout"), b"O"), Stream(os.path.join(d, "stderr"), b"E")]
    caught_up = False
    poll = POLL_MIN_SECONDS
    try:
        while True:
            # Read the result before draining: output written before it was recorded is not missed.
            result = read_result(d)
            moved = False
            for stream in streams:
                moved = stream.drain(ch, None if caught_up else replay) or moved
            if not ch.open:
                return False
            if not caught_up:
                ch.message("caughtUp")
                caught_up = True
            if result is not None:
                break
            if supervisor_gone(fate, sup) and read_result(d) is None:
                pids = pids or read_pids(d)
                if not pids or not group_alive(pids["pid"], pids.get("start")):
                    # Killed (say by the OOM killer) before it recorded anything: the status is lost.
                    result = {"error": "the script's supervisor died, so its exit status is unknown"}
                    break
            if moved:
                poll = POLL_MIN_SECONDS
                ch.beat()
            else:
                pause(ch, sup, poll)
                poll = min(POLL_MAX_SECONDS, poll * 1.5)
    finally:
        for stream in streams:
            stream.close()
    totals = {}
    for name in ("stdout", "stderr"):
        try:
            totals[name] = os.path.getsize(os.path.join(d, name))
        except OSError:
            totals[name] = 0
    ch.message("result", result=result, totals=totals)
    return True


def finish(ch: Channel, stdin: BinaryIO, d: str, retain: Any = None) -> None:
    """After the result: the operator acknowledges with "forget" once it has recorded it."""
    if ch.open and read_ack(ch, stdin, ACK_TIMEOUT_SECONDS).strip() == b"forget":
        removed, retained, skipped, _ = forget([d], [], {d: retain} if retain else {})
        ch.message("forgotten", removed=removed, retained=retained, skipped=skipped)


def op_read(ch: Channel, req: dict[str, Any]) -> None:
    """D's whole stdout (or stderr) from its first byte; with `follow`, on until the script ended. Reads
    only: a D nobody decided yet is waited for (follow) or reported, never settled."""
    d = req["dir"]
    name = "stderr" if req.get("stream") == "stderr" else "stdout"
    live = bool(req.get("follow"))
    if not os.path.isdir(d):
        ch.message("missing")
        return
    mark = read_retain_mark(d)
    if mark is not None and mark[0] <= time.time() * 1000:
        ch.message("expired", at=mark[0] / 1000)
        return
    fate = read_fate(d)
    poll = POLL_MIN_SECONDS
    deadline = time.monotonic() + DECIDE_TIMEOUT_SECONDS
    while fate is None and live and os.path.isdir(d) and time.monotonic() < deadline:
        ch.pause(poll)
        poll = min(POLL_MAX_SECONDS, poll * 1.5)
        fate = read_fate(d)
    if fate is None:
        ch.message("missing" if not os.path.isdir(d) else "notStarted")
        return
    if fate.killed:
        ch.message("tombstoned")
        return
    stream = Stream(os.path.join(d, name), b"O" if name == "stdout" else b"E")
    result = None
    removed = False
    poll = POLL_MIN_SECONDS
    try:
        while True:
            # As follow does: the result first, so that output written before it is not missed.
            result = read_result(d)
            removed = not os.path.isdir(d)
            moved = stream.drain(ch, None)
            if not ch.open:
                return
            if result is not None or removed or not live:
                break
            if not may_be_running(d, fate) and read_result(d) is None and fate.supervisor is not None:
                stream.drain(ch, None)
                break  # its supervisor died without a result: nothing more will come
            if moved:
                poll = POLL_MIN_SECONDS
                ch.beat()
            else:
                ch.pause(poll)
                poll = min(POLL_MAX_SECONDS, poll * 1.5)
        if removed and stream.file is None:
            ch.message("missing")  # forgotten before anything of it could be read
            return
    finally:
        stream.close()
    totals: dict[str, int | None] = {}
    for stream_name in ("stdout", "stderr"):
        try:
            totals[stream_name] = os.path.getsize(os.path.join(d, stream_name))
        except OSError:
            totals[stream_name] = None
    running = result is None and not removed and may_be_running(d, fate)
    mark = read_retain_mark(d)
    until = mark[0] / 1000 if mark is not None else None
    ch.message("end", result=result, totals=totals, running=running, removed=removed, retainedUntil=until)


# ---------------------------------------------------------------------------------------------------
# Operations


class Busy(Exception):
    """The pod's lock is held in a way that excludes this run."""


def take_pod_lock(d: str, lock: dict[str, Any]) -> int:
    """The pod's lock, shared or exclusive, taken without waiting; an fd the supervisor inherits."""
    import fcntl  # noqa: PLC0415 - a C module, only for runs that ask for the lock

    root = os.path.dirname(os.path.dirname(d.rstrip("/")))
    path = os.path.join(root, ".pod-" + str(lock["pod"]) + ".lock")
    try:
        os.makedirs(root, 0o700, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as e:
        raise not_writable(e, e.filename or path, d) from None
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if lock.get("exclusive") else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise Busy() from None
    return fd


def lock_holders(d: str, pod: str) -> list[str]:
    """The tasks whose scripts may be running in this pod (attempts claimed with podLock), but D's."""
    root = os.path.dirname(os.path.dirname(d.rstrip("/")))
    found = []
    with ignoring(OSError):
        for task in os.listdir(root):
            with ignoring(OSError):
                for attempt in os.listdir(os.path.join(root, task)):
                    other = os.path.join(root, task, attempt)
                    claim = read_json(os.path.join(other, "task"))
                    if other == d.rstrip("/") or not isinstance(claim, dict) or claim.get("pod") != pod:
                        continue
                    fate = read_fate(other)
                    if fate is not None and may_be_running(other, fate):
                        found.append(str(claim.get("task")))
    return sorted(set(found))


def op_run(ch: Channel, stdin: BinaryIO, req: dict[str, Any]) -> None:
    d = req["dir"]
    script = read_blob(stdin)
    lock = req.get("podLock")
    held = Held()
    if lock and not os.path.isdir(d):
        try:
            held.fd = take_pod_lock(d, lock)
        except Busy:
            ch.message("busy", tasks=lock_holders(d, str(lock["pod"])))
            return
    try:
        run_claiming(ch, stdin, req, script, held)
    finally:
        held.close()


class Held:
    """Our copy of the pod lock's fd: let go once the supervisor (which inherits it) is forked, or when
    nothing was started; closing twice must not close an unrelated fd that reused the number."""

    fd = -1

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


def run_claiming(ch: Channel, stdin: BinaryIO, req: dict[str, Any], script: bytes, held: Held) -> None:
    d = req["dir"]
    replay = int(req.get("tail", 65536))
    lock = req.get("podLock")
    if not os.path.isdir(d):
        path = req.get("scriptPath")
        if path and not os.path.isfile(path):
            raise Failure(f"{path} is not a file in the container", "ScriptNotFound")
        run = Run(d, req)
        age = process_age()
        if age is not None and age > START_WINDOW_SECONDS:
            raise Failure(
                f"the agent got its request {age:.0f}s after it started (more than "
                f"{START_WINDOW_SECONDS:g}s): the operator has given up on this exec, so it starts nothing"
            )
        parent = os.path.dirname(d.rstrip("/"))
        for again in (True, False):
            try:
                os.makedirs(parent, 0o700, exist_ok=True)
            except OSError as e:
                raise not_writable(e, parent, d) from None
            try:
                os.mkdir(d, 0o700)  # the claim: exclusive
                claimed = True
            except FileExistsError:
                claimed = False
            except FileNotFoundError as e:
                if again:
                    continue  # a forget removed the (then empty) task directory in between
                raise not_writable(e, d, d) from None
            except OSError as e:
                raise not_writable(e, d, d) from None
            break
        if claimed:
            try:
                if not req.get("scriptPath"):
                    write_new(run.path, script)
                write_new(os.path.join(d, "mask.json"), to_json(run.mask).encode())
                if lock:
                    claim = {"task": lock.get("task"), "pod": str(lock["pod"])}
                    write_new(os.path.join(d, "task"), to_json(claim).encode())
            except OSError as e:
                settle(d, f"not started: {e}")  # claimed but never to start: a follower need not wait
                raise not_writable(e, e.filename or d, d) from None
            try:
                sup = Supervisor(*spawn_supervisor(run))
            except OSError as e:
                settle(d, f"not started: {e}")
                raise Failure(f"cannot start the script's supervisor: {e}") from None
            SUPERVISORS.append(sup)
            held.close()  # the supervisor holds the pod lock until its script has ended
            ch.message("accepted", fresh=True)
            if follow(ch, d, None, sup):
                sup.reap()
                finish(ch, stdin, d, req.get("retain"))
            return
    fate = read_fate(d)
    if fate is not None and fate.killed:
        ch.message("tombstoned")
        return
    held.close()  # following someone else's claim: the pod lock is its supervisor's to hold
    ch.message("accepted", fresh=False)
    if follow(ch, d, replay):
        finish(ch, stdin, d, req.get("retain"))


def op_follow(ch: Channel, stdin: BinaryIO, req: dict[str, Any]) -> None:
    d = req["dir"]
    if not os.path.isdir(d):
        ch.message("missing")
    elif follow(ch, d, int(req.get("tail", 65536))):
        finish(ch, stdin, d, req.get("retain"))


def op_kill(ch: Channel, req: dict[str, Any]) -> None:
    d = req["dir"]
    why = str(req.get("why") or "killed")
    grace = float(req.get("grace", 5))
    # Decided already (it runs, or it is a tombstone)? Then nothing needs writing: a full disk must never
    # stop a kill.
    fate = read_fate(d) if os.path.isdir(d) else None
    if fate is None:
        try:
            os.makedirs(d, 0o700, exist_ok=True)
            tombstoned = decide(d, "killed " + why)
        except OSError as e:
            if os.path.isdir(d):
                raise not_writable(e, d, d) from None
            # Nothing can be there, and nothing can start there.
            ch.message("killed", wasRunning=False, gone=True, forced=False, tombstoned=False)
            return
        fate = Fate("killed") if tombstoned else read_fate(d) or Fate("")
    if fate.killed:
        ch.message("killed", wasRunning=False, gone=True, forced=False, tombstoned=True)
        return
    # It was started: wait until the supervisor recorded the script's pid (it forks right after deciding).
    deadline = time.monotonic() + DECIDE_TIMEOUT_SECONDS
    pids = read_pids(d)
    while pids is None and fate.supervisor_alive() and time.monotonic() < deadline:
        ch.pause(0.01)
        pids = read_pids(d)
    if pids is None or os.path.exists(os.path.join(d, "result.json")):
        gone = not fate.supervisor_alive()
        ch.message("killed", wasRunning=False, gone=gone, forced=False, tombstoned=False)
        return
    pgid, start = pids["pid"], pids.get("start")
    if not group_alive(pgid, start):
        ch.message("killed", wasRunning=False, gone=True, forced=False, tombstoned=False)
        return
    with ignoring(OSError):  # killing it matters more than saying why
        # Before signalling: a result recorded after our signal says who killed it, even if the operator
        # crashes before writing its status.
        write_atomic(os.path.join(d, "killed"), to_json({"why": why, "at": time.time()}))
    forced = False
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, KILL_FORCED_WAIT_SECONDS)):
        forced = sig == signal.SIGKILL
        with ignoring(OSError):
            os.killpg(pgid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and group_alive(pgid, start):
            ch.pause(0.02)
        if not group_alive(pgid, start):
            break
    ch.message("killed", wasRunning=True, gone=not group_alive(pgid, start), forced=forced, tombstoned=False)


def removable(d: str) -> bool:
    """Whether D can go: its script is not running and can never start (an undecided D is tombstoned)."""
    fate = settle(d, "forgotten")
    return fate is None or not may_be_running(d, fate)


def remove_tree(path: str) -> None:
    """rm -r (shutil's import costs more than this)."""
    try:
        entries = list(os.scandir(path))
    except OSError:
        return
    for entry in entries:
        with ignoring(OSError):
            if entry.is_dir(follow_symlinks=False):
                remove_tree(entry.path)
            else:
                os.unlink(entry.path)
    with ignoring(OSError):
        os.rmdir(path)


def forget(
    dirs: list[str], tasks: list[str], retain: dict[str, Any] | None = None
) -> tuple[int, int, int, list[str]]:
    """Removes attempt directories (and task directories, whole) whose scripts are not running; those
    that `retain` names (and whose script ran and ended) are retained instead."""
    removed, retained, skipped = 0, 0, []
    retain = retain if isinstance(retain, dict) else {}

    def attempt(d: str, keep: Any = None) -> bool:
        nonlocal removed, retained
        if not os.path.isabs(d) or os.path.normpath(d) == "/":
            skipped.append(d)  # never ours
            return False
        if not os.path.isdir(d):
            return not os.path.lexists(d)
        if keep and retain_dir(d, keep):
            retained += 1
            return False
        if not removable(d):
            skipped.append(d)
            return False
        remove_tree(d)
        if os.path.lexists(d):
            skipped.append(d)
            return False
        removed += 1
        return True

    for d in dirs:
        if attempt(d, retain.get(d)):
            with ignoring(OSError):
                os.rmdir(os.path.dirname(os.path.normpath(d)))  # the task dir, if that was its last one
    for t in tasks:
        if not os.path.isabs(t) or os.path.normpath(t) == "/" or not os.path.isdir(t):
            continue
        entries = [os.path.join(t, name) for name in os.listdir(t)]
        kept = [e for e in entries if os.path.isdir(e) and not os.path.islink(e) and not attempt(e)]
        if not kept:
            remove_tree(t)
    return removed, retained, len(skipped), skipped


# ---------------------------------------------------------------------------------------------------
# Retention


def read_retain_mark(d: str) -> tuple[int, str] | None:
    """(until, in epoch milliseconds; run) of a retained D, else None."""
    text = read_text(os.path.join(d, RETAIN_MARK))
    parts = text.split() if text else []
    if not parts or not parts[0].isdigit():
        return None
    return int(parts[0]), parts[1] if len(parts) > 1 else ""


def retained_entry(d: str, until: int) -> str:
    d = os.path.normpath(d)
    task = os.path.dirname(d)
    return os.path.join(
        os.path.dirname(task), RETAINED_INDEX, f"{until:015d}.{os.path.basename(task)}.{os.path.basename(d)}"
    )


def output_bytes(d: str) -> int:
    total = 0
    for name in ("stdout", "stderr"):
        with ignoring(OSError):
            total += os.path.getsize(os.path.join(d, name))
    return total


def retain_dir(d: str, keep: Any) -> bool:
    """Marks D retained (True), when its script ran and ended and `keep` asks for it; then makes room
    in its task's retained output (other runs' Ds, then the oldest over the bound). False: forget D."""
    if not isinstance(keep, dict):
        return False
    try:
        seconds = float(keep.get("seconds") or 0)
        limit = int(keep.get("bytes") or 0)
    except (TypeError, ValueError):
        return False
    run = str(keep.get("run") or "-").split()[0]
    fate = read_fate(d)
    if seconds <= 0 or fate is None or fate.killed or may_be_running(d, fate):
        return False
    if read_retain_mark(d) is None:  # marked before (a second forget): kept as it was
        until = int((time.time() + seconds) * 1000)
        entry = retained_entry(d, until)
        try:
            os.makedirs(os.path.dirname(entry), 0o700, exist_ok=True)
            os.close(os.open(entry, os.O_WRONLY | os.O_CREAT, 0o600))
            write_atomic(os.path.join(d, RETAIN_MARK), f"{until} {run}\n")
        except OSError:
            with ignoring(OSError):
                os.unlink(entry)
            return False  # cannot be marked (a full disk): forgotten as before retention existed
    make_room(d, run, limit)
    return True


def drop_retained(d: str, until: int) -> bool:
    """Removes a retained D and its index entry; False (nothing done) while its script may be running. A
    D that did not run (a tombstone, or undecided) is never removed here, only its entry."""
    fate = read_fate(d) if os.path.isdir(d) else None
    if fate is not None and not fate.killed:
        if may_be_running(d, fate):
            return False
        remove_tree(d)
        if os.path.lexists(d):
            return False
        with ignoring(OSError):
            os.rmdir(os.path.dirname(os.path.normpath(d)))  # the task dir, if that was its last one
    with ignoring(OSError):
        os.unlink(retained_entry(d, until))
    return True


def make_room(d: str, run: str, limit: int) -> None:
    """D was just retained: its task's retained Ds of other runs go, then the oldest of its own run while
    the run's retained stdout+stderr exceed `limit` (D itself always stays: it was within its bound)."""
    d = os.path.normpath(d)
    task = os.path.dirname(d)
    try:
        names = os.listdir(task)
    except OSError:
        return
    same_run = []
    for name in names:
        other = os.path.join(task, name)
        mark = read_retain_mark(other) if other != d else None
        if mark is None:
            continue  # D itself, or not retained: running, a tombstone, or not forgotten yet
        if mark[1] != run:
            drop_retained(other, mark[0])
        else:
            same_run.append((mark[0], other))
    if limit <= 0:
        return
    total = output_bytes(d) + sum(output_bytes(other) for _, other in same_run)
    for until, other in sorted(same_run):
        if total <= limit:
            break
        size = output_bytes(other)
        if drop_retained(other, until):
            total -= size


def sweep(state_dir: str) -> int:
    """Removes retained Ds whose time is up, oldest first, at most SWEEP_LIMIT; returns how many."""
    index = os.path.join(state_dir, RETAINED_INDEX)
    try:
        names = sorted(os.listdir(index))
    except OSError:
        return 0
    now = time.time() * 1000
    done = 0
    for name in names:
        parts = name.split(".")
        if len(parts) != 3 or not parts[0].isdigit() or not all(parts):
            continue
        until = int(parts[0])
        if until > now or done >= SWEEP_LIMIT:
            break
        d = os.path.join(state_dir, parts[1], parts[2])
        mark = read_retain_mark(d)
        if mark is not None and mark[0] == until:
            if not drop_retained(d, until):
                continue
        else:
            with ignoring(OSError):  # its D is gone (a task purged) or was never marked
                os.unlink(os.path.join(index, name))
        done += 1
    return done


def swept_in(req: dict[str, Any]) -> None:
    """Expired retained Ds go on every run, follow and forget (after its own work, never failing it)."""
    paths = [req.get("dir"), *(req.get("dirs") or []), *(req.get("tasks") or [])]
    path = next((p for p in paths if isinstance(p, str) and os.path.isabs(p)), None)
    if path is None:
        return
    depth = 1 if req.get("op") == "forget" and not req.get("dir") and not req.get("dirs") else 2
    state_dir = os.path.normpath(path)
    for _ in range(depth):
        state_dir = os.path.dirname(state_dir)
    if state_dir != "/":
        with ignoring(Exception):
            sweep(state_dir)


def main() -> int:
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # a gone stream is an EPIPE we handle, not death
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # so our supervisor is ours to reap
    ch = Channel()
    stdin = sys.stdin.buffer
    try:
        req = from_json(read_blob(stdin))
        op = req.get("op")
        if op == "run":
            op_run(ch, stdin, req)
        elif op == "follow":
            op_follow(ch, stdin, req)
        elif op == "kill":
            op_kill(ch, req)
        elif op == "forget":
            dirs, tasks = req.get("dirs") or [], req.get("tasks") or []
            removed, retained, skipped, skipped_dirs = forget(dirs, tasks, req.get("retain"))
            ch.message(
                "forgotten", removed=removed, retained=retained, skipped=skipped, skippedDirs=skipped_dirs
            )
        elif op == "read":
            op_read(ch, req)
        else:
            raise Failure(f"unknown op {op!r}")
        if op in ("run", "follow", "forget"):
            swept_in(req)
    except Failure as e:
        fields = {"reason": e.reason} if e.reason else {}
        ch.message("error", message=str(e), **fields)
        return 1
    except Exception as e:
        tb = e.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        where = f" (agent line {tb.tb_lineno})" if tb is not None else ""
        ch.message("error", message=f"the agent failed: {type(e).__name__}: {e}{where}")
        return 1
    finally:
        for sup in SUPERVISORS:
            sup.reap()
    return 0


if __name__ == "__main__":
    # os._exit: nothing is buffered (we write with os.write), and a reader thread blocked on stdin must
    # not hold up the interpreter's shutdown.
    os._exit(main())
