"""`kubectl pythontask`: the kubectl plugin, installed with the package as the `kubectl-pythontask` command
(kubectl runs any `kubectl-<name>` on PATH as `kubectl <name>`).

    kubectl pythontask logs NAME [-f] [--attempt N] [--stderr]   the whole output of an attempt
    kubectl pythontask describe NAME                              phase, reason, message, attempt history
    kubectl pythontask rerun NAME                                 run a finished task again
    kubectl pythontask cancel NAME                                suspend it (spec.suspend: true)

It acts with the user's own kubeconfig and rights (KUBECONFIG, --kubeconfig, --context, -n): `logs` execs
into the attempt's pod as the user and runs the agent's read-only `read` op, which streams the attempt's
stdout (or stderr) from its first byte. A finished attempt's files are there while spec.output.retain
keeps them (see docs/design.md, "Output retention"). Everything else here is plain API reads and patches.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from . import durations, exec_wire
from .agent_protocol import (
    AgentProtocolError,
    AgentStreamDecoder,
    Message,
    Output,
    agent_command,
    encode_stdin,
)
from .exec_client import ExecError, ExecTarget, open_exec
from .spec import DEFAULT_RETAIN, DEFAULT_TAIL_BYTES, GROUP, PLURAL, VERSION

RERUN_ANNOTATION = "pythontask.dev/rerun"  # as runner.RERUN_ANNOTATION (not imported: it pulls in kopf)
DEFAULT_STATE_DIR = "/tmp/pythontask"  # the operator's default PYTHONTASK_STATE_DIR
# -f on an attempt recorded a moment ago: its directory appears once the agent claims it.
CLAIM_WAIT_SECONDS = 60.0
POLL_SECONDS = 1.0
EXEC_CONNECT_SECONDS = 30.0


class PluginError(Exception):
    """Said to the user as `error: ...`, exit status 1."""


# ---------------------------------------------------------------------------------------------------
# Arguments


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-n", "--namespace", default=argparse.SUPPRESS, help="the task's namespace")
    common.add_argument("--context", default=argparse.SUPPRESS, help="the kubeconfig context to use")
    common.add_argument("--kubeconfig", default=argparse.SUPPRESS, help="path to the kubeconfig file")
    top = argparse.ArgumentParser(
        prog="kubectl pythontask",
        description="Read and steer PythonTasks with your own kubeconfig and rights.",
        parents=[common],
    )
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    logs = commands.add_parser(
        "logs",
        parents=[common],
        help="print the whole stdout (or stderr) of an attempt",
        description="Prints the whole stdout (or --stderr) of the task's current or last attempt, or of "
        "--attempt N, from the attempt's files in its container. A finished attempt's files are kept "
        "for spec.output.retain.",
    )
    logs.add_argument("name", metavar="NAME")
    logs.add_argument("-f", "--follow", action="store_true", help="go on printing until the script ends")
    logs.add_argument("--attempt", type=_attempt_number, metavar="N", help="attempt N (1, 2, ...)")
    logs.add_argument("--stderr", action="store_true", help="stderr instead of stdout")
    logs.add_argument(
        "--state-dir",
        metavar="PATH",
        help="the agent's state directory in the container, if status does not say "
        f"(the operator's PYTHONTASK_STATE_DIR; default {DEFAULT_STATE_DIR})",
    )
    for name, text in (
        ("describe", "phase, reason, message and the attempt history as a table"),
        ("rerun", f"run the task again (sets the {RERUN_ANNOTATION} annotation)"),
        ("cancel", "suspend the task (spec.suspend: true)"),
    ):
        sub = commands.add_parser(
            name, parents=[common], help=text, description=text[0].upper() + text[1:] + "."
        )
        sub.add_argument("name", metavar="NAME")
    return top


def _attempt_number(text: str) -> int:
    try:
        number = int(text)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be an attempt number (1, 2, ...), not {text!r}")
    return number


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Global flags are taken before and after the command (kubectl passes a plugin what follows its
    name: `kubectl pythontask -n ns logs x` and `kubectl pythontask logs x -n ns` both work)."""
    args = parser().parse_args(list(argv))
    for name in ("namespace", "context", "kubeconfig"):
        if not hasattr(args, name):
            setattr(args, name, None)
    return args


# ---------------------------------------------------------------------------------------------------
# What status says (pure)


@dataclass(frozen=True)
class Attempt:
    number: int
    id: str
    pod: str
    container: str
    start: float | None
    end: float | None  # None while it runs
    exit_code: int | None
    reason: str

    @property
    def running(self) -> bool:
        return self.end is None


def _time(text: Any) -> float | None:
    if not isinstance(text, str):
        return None
    try:
        return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC).timestamp()
    except ValueError:
        return None


def _attempt(
    entry: dict[str, Any], number: int, end: float | None, exit_code: int | None, reason: str
) -> Attempt:
    """An attempt as a history entry or `currentAttempt` records it."""
    return Attempt(
        number=number,
        id=str(entry.get("id") or ""),
        pod=str(entry.get("pod") or ""),
        container=str(entry.get("container") or ""),
        start=_time(entry.get("startTime")),
        end=end,
        exit_code=exit_code,
        reason=reason,
    )


def attempts_of(status: dict[str, Any]) -> list[Attempt]:
    """The attempts status knows, in order: its history (the last 10 of this run), then the one in flight."""
    out = [
        _attempt(
            h,
            h["attempt"],
            end=_time(h.get("completionTime")) or 0.0,
            exit_code=h.get("exitCode") if isinstance(h.get("exitCode"), int) else None,
            reason=str(h.get("reason") or ""),
        )
        for h in status.get("history") or []
        if isinstance(h, dict) and isinstance(h.get("attempt"), int)
    ]
    current = status.get("currentAttempt")
    if isinstance(current, dict) and isinstance(current.get("number"), int):
        out.append(_attempt(current, current["number"], end=None, exit_code=None, reason="Running"))
    return out


def pick_attempt(task: dict[str, Any], number: int | None) -> Attempt:
    """Attempt `number`, or the one in flight, else the last one; PluginError saying why there is none."""
    name = task["metadata"]["name"]
    attempts = attempts_of(task.get("status") or {})
    if number is None:
        if not attempts:
            raise PluginError(f"pythontask {name} has not started an attempt yet")
        chosen = attempts[-1]
    else:
        found = [a for a in attempts if a.number == number]
        if not found:
            known = ", ".join(str(a.number) for a in attempts) or "none"
            raise PluginError(
                f"pythontask {name} has no attempt {number} in its status (attempts of its current run "
                f"that status keeps: {known})"
            )
        chosen = found[-1]
    if not chosen.id or not chosen.container:
        raise PluginError(
            f"attempt {chosen.number} of pythontask {name} was recorded by an operator older than "
            "`kubectl pythontask logs` (no attempt id in status): its files cannot be found"
        )
    return chosen


def attempt_dir(task: dict[str, Any], attempt: Attempt, state_dir: str | None) -> str:
    status = task.get("status") or {}
    root = state_dir or status.get("stateDir") or DEFAULT_STATE_DIR
    return f"{str(root).rstrip('/')}/{task['metadata']['uid']}/{attempt.id}"


def retain_of(task: dict[str, Any]) -> str:
    output = (task.get("spec") or {}).get("output") or {}
    return str(output.get("retain") or DEFAULT_RETAIN)


def _retained(task: dict[str, Any]) -> bool:
    try:
        return durations.parse(retain_of(task)) > 0
    except ValueError:
        return False


def gone_message(task: dict[str, Any], attempt: Attempt, stream: str) -> str:
    """Why a finished attempt's files are not in its container, and where what is left is."""
    name = task["metadata"]["name"]
    tail = ((task.get("spec") or {}).get("output") or {}).get("tailBytes", DEFAULT_TAIL_BYTES)
    where = (
        f"status keeps the last {tail} bytes of the last attempt: "
        f"kubectl get pythontask {name} -o jsonpath='{{.status.output.{stream}}}'"
    )
    if not _retained(task):
        return (
            f"the output of attempt {attempt.number} is no longer in pod {attempt.pod}: "
            f"spec.output.retain is {retain_of(task)}, so it was removed once its result was recorded "
            f"({where}; set spec.output.retain to keep the whole output)"
        )
    return (
        f"the output of attempt {attempt.number} is no longer in pod {attempt.pod}: it was removed (a "
        f"newer run replaced it, the task's retained output went past spec.output.maxBytes, its "
        f"spec.output.retain of {retain_of(task)} ran out, or the container restarted); {where}"
    )


def expired_message(attempt: Attempt, at: float, retain: str) -> str:
    when = dt.datetime.fromtimestamp(at, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return (
        f"the output of attempt {attempt.number} is no longer retained: it expired at {when} "
        f"(spec.output.retain: {retain})"
    )


def duration_text(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m" if minutes else f"{hours}h"
    if minutes:
        return f"{minutes}m{secs}s" if secs else f"{minutes}m"
    return f"{secs}s"


def table(rows: Sequence[Sequence[str]]) -> str:
    """Columns as kubectl prints them: left-aligned, three spaces apart, no trailing blanks."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "   ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    return "\n".join(lines) + "\n"


def describe_text(task: dict[str, Any], now: float) -> str:
    meta, status = task["metadata"], task.get("status") or {}
    fields = [
        ("Name", meta["name"]),
        ("Namespace", meta.get("namespace", "")),
        ("Phase", status.get("phase") or "Pending"),
        ("Reason", status.get("reason") or ""),
        ("Message", status.get("message") or ""),
        ("Attempts", str(status.get("attempts") or 0)),
    ]
    if isinstance(status.get("exitCode"), int):
        fields.append(("Exit Code", str(status["exitCode"])))
    if status.get("nextRetryTime"):
        fields.append(("Next Retry", str(status["nextRetryTime"])))
    retain = retain_of(task)
    fields.append(
        (
            "Output",
            f"kept {retain} after each attempt (spec.output.retain)"
            if _retained(task)
            else "removed once recorded (spec.output.retain: 0s); status keeps the tails",
        )
    )
    width = max(len(key) for key, _ in fields) + 3  # the colon and two spaces
    text = "".join(f"{(key + ':').ljust(width)}{value}\n" for key, value in fields)
    attempts = attempts_of(status)
    if not attempts:
        return text + "\nNo attempts yet.\n"
    rows = [["ATTEMPT", "POD", "CONTAINER", "STARTED", "DURATION", "EXIT", "REASON"]]
    for a in attempts:
        started = (
            dt.datetime.fromtimestamp(a.start, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if a.start else "-"
        )
        if a.start is None:
            took = "-"
        elif a.running:
            took = duration_text(now - a.start) + " (running)"
        else:
            took = duration_text((a.end or a.start) - a.start)
        exit_code = str(a.exit_code) if a.exit_code is not None else "-"
        rows.append(
            [str(a.number), a.pod or "-", a.container or "-", started, took, exit_code, a.reason or "-"]
        )
    return text + "\n" + table(rows)


# ---------------------------------------------------------------------------------------------------
# The API, as the user


async def connect(args: argparse.Namespace) -> tuple[client.ApiClient, str]:
    """An API client from the user's kubeconfig, and the namespace: -n, else the context's, else default."""
    configuration = client.Configuration()
    try:
        await config.load_kube_config(
            config_file=args.kubeconfig, context=args.context, client_configuration=configuration
        )
        contexts, active = config.list_kube_config_contexts(config_file=args.kubeconfig)
    except (config.ConfigException, OSError, ValueError) as e:
        raise PluginError(f"cannot load the kubeconfig: {e}") from None
    namespace = args.namespace
    if not namespace:
        chosen = (
            next((c for c in contexts if c.get("name") == args.context), None) if args.context else active
        )
        namespace = ((chosen or {}).get("context") or {}).get("namespace") or "default"
    return client.ApiClient(configuration), namespace


def _api_problem(e: ApiException, what: str) -> PluginError:
    try:
        message = json.loads(e.body or b"").get("message") or e.reason
    except (TypeError, ValueError, AttributeError):
        message = e.reason
    return PluginError(f"{what}: {message}")


async def get_task(api: client.ApiClient, namespace: str, name: str) -> dict[str, Any]:
    try:
        task: dict[str, Any] = await client.CustomObjectsApi(api).get_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name
        )
    except ApiException as e:
        if e.status == 404:
            raise PluginError(f'pythontasks.{GROUP} "{name}" not found in namespace {namespace}') from None
        raise _api_problem(e, f"cannot read pythontask {name}") from None
    return task


async def patch_task(
    api: client.ApiClient, namespace: str, name: str, body: dict[str, Any], **options: Any
) -> dict[str, Any]:
    objects: Any = client.CustomObjectsApi(api)
    try:
        task: dict[str, Any] = await objects.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            name,
            body,
            _content_type="application/merge-patch+json",
            **options,
        )
    except ApiException as e:
        if e.status == 404:
            raise PluginError(f'pythontasks.{GROUP} "{name}" not found in namespace {namespace}') from None
        raise _api_problem(e, f"cannot change pythontask {name}") from None
    return task


# ---------------------------------------------------------------------------------------------------
# Commands


class _Unreadable(Exception):
    def __init__(self, kind: str, fields: dict[str, Any]) -> None:
        super().__init__(kind)
        self.kind, self.fields = kind, fields


async def read_attempt(
    api: client.ApiClient,
    target: ExecTarget,
    python: list[str],
    directory: str,
    *,
    stream: str,
    follow: bool,
    out: BinaryIO,
) -> dict[str, Any]:
    """One exec of the agent's `read` op: writes the stream's bytes to `out` as they come; returns the
    `end` message, or raises _Unreadable (missing, expired, tombstoned, notStarted)."""
    decoder = AgentStreamDecoder()
    request = {"op": "read", "dir": directory, "stream": stream, "follow": follow}
    async with open_exec(api, target, agent_command(python), connect_timeout=EXEC_CONNECT_SECONDS) as ws:
        await ws.write_stdin(encode_stdin(request))
        agent_stderr = b""
        async for channel, data in ws.frames():
            if channel == exec_wire.STDERR:
                agent_stderr += data[:4096]
                continue
            for event in decoder.feed(data):
                if isinstance(event, Output):
                    out.write(event.data)
                    out.flush()
                    continue
                assert isinstance(event, Message)
                if event.type == "end":
                    return event.fields
                if event.type == "error":
                    raise PluginError(f"the agent in pod {target.pod} failed: {event.fields.get('message')}")
                if event.type in ("missing", "expired", "tombstoned", "notStarted"):
                    raise _Unreadable(event.type, event.fields)
        status = ws.status
    problem = agent_stderr.decode(errors="replace").strip() or (status.message if status else "")
    raise PluginError(f"the output stream from pod {target.pod} ended early: {problem or 'no reason given'}")


async def logs(api: client.ApiClient, namespace: str, args: argparse.Namespace, out: BinaryIO) -> None:
    name = args.name
    task = await get_task(api, namespace, name)
    if args.follow and args.attempt is None:
        while not attempts_of(task.get("status") or {}):  # -f on a task that has not started yet: wait
            await asyncio.sleep(POLL_SECONDS)
            task = await get_task(api, namespace, name)
    attempt = pick_attempt(task, args.attempt)
    try:
        pod = await client.CoreV1Api(api).read_namespaced_pod(attempt.pod, namespace)
    except ApiException as e:
        if e.status == 404:
            raise PluginError(
                f"pod {attempt.pod} of attempt {attempt.number} is gone, and the attempt's output with it"
            ) from None
        raise _api_problem(e, f"cannot read pod {attempt.pod}") from None
    phase = (pod.status.phase if pod.status else None) or ""
    if phase in ("Succeeded", "Failed"):
        raise PluginError(f"pod {attempt.pod} has ended ({phase}): the attempt's output is gone")
    stream = "stderr" if args.stderr else "stdout"
    python = list((task.get("spec") or {}).get("python") or ["python3"])
    target = ExecTarget(namespace, attempt.pod, attempt.container)
    directory = attempt_dir(task, attempt, args.state_dir)
    loop = asyncio.get_running_loop()
    waited_from = loop.time()
    while True:
        try:
            await read_attempt(api, target, python, directory, stream=stream, follow=args.follow, out=out)
            return
        except _Unreadable as e:
            if e.kind == "expired":
                raise PluginError(
                    expired_message(attempt, float(e.fields.get("at") or 0), retain_of(task))
                ) from None
            if e.kind == "tombstoned":
                raise PluginError(
                    f"attempt {attempt.number} never started its script ({attempt.reason or 'NotStarted'}): "
                    "it has no output"
                ) from None
            if e.kind == "notStarted" and not args.follow:
                raise PluginError(f"attempt {attempt.number} has not started its script yet") from None
            # Missing: an attempt recorded a moment ago is claimed by the agent shortly (with -f, wait for
            # that while status still says it runs); a finished one was removed.
            still = attempt.running and args.follow and loop.time() - waited_from < CLAIM_WAIT_SECONDS
            if still:
                fresh = await get_task(api, namespace, name)
                current = (fresh.get("status") or {}).get("currentAttempt") or {}
                still = current.get("id") == attempt.id
            if not still:
                if attempt.running:
                    raise PluginError(
                        f"attempt {attempt.number} has no files in pod {attempt.pod} yet (it was just "
                        "recorded, or the container restarted); try again, or use -f to wait for it"
                    ) from None
                raise PluginError(gone_message(task, attempt, stream)) from None
            await asyncio.sleep(POLL_SECONDS)
        except (ExecError, AgentProtocolError) as e:
            raise PluginError(f"cannot read the output from pod {attempt.pod}: {e}") from None


async def describe(api: client.ApiClient, namespace: str, args: argparse.Namespace, out: BinaryIO) -> None:
    task = await get_task(api, namespace, args.name)
    out.write(describe_text(task, dt.datetime.now(dt.UTC).timestamp()).encode())


async def rerun(api: client.ApiClient, namespace: str, args: argparse.Namespace, out: BinaryIO) -> None:
    token = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    await patch_task(api, namespace, args.name, {"metadata": {"annotations": {RERUN_ANNOTATION: token}}})
    out.write(f"pythontask.{GROUP}/{args.name} rerun requested ({RERUN_ANNOTATION}={token})\n".encode())


async def cancel(api: client.ApiClient, namespace: str, args: argparse.Namespace, out: BinaryIO) -> None:
    try:
        task = await patch_task(
            api, namespace, args.name, {"spec": {"suspend": True}}, field_validation="Strict"
        )
    except PluginError as e:
        if "suspend" in str(e) and ("unknown field" in str(e) or "not declared" in str(e)):
            raise PluginError(suspend_unsupported(args.name)) from None
        raise
    if (task.get("spec") or {}).get("suspend") is not True:
        raise PluginError(suspend_unsupported(args.name))
    out.write(f"pythontask.{GROUP}/{args.name} suspended (spec.suspend: true)\n".encode())


def suspend_unsupported(name: str) -> str:
    return (
        f"cannot cancel pythontask {name}: this cluster's PythonTask CRD has no spec.suspend (install an "
        "operator release that supports it)"
    )


COMMANDS: dict[str, Callable[[client.ApiClient, str, argparse.Namespace, BinaryIO], Any]] = {
    "logs": logs,
    "describe": describe,
    "rerun": rerun,
    "cancel": cancel,
}


async def run(args: argparse.Namespace, out: BinaryIO) -> None:
    api, namespace = await connect(args)
    async with api:
        await COMMANDS[args.command](api, namespace, args, out)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        asyncio.run(run(args, sys.stdout.buffer))
    except PluginError as e:
        sys.stdout.flush()
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0  # `| head`: the reader has what it wanted
    return 0


if __name__ == "__main__":
    sys.exit(main())
