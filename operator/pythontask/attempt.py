"""One attempt: exec the agent into the pod, stream its framed output, and report what happened.

The script's exit code comes from the agent's in-band result, not from the exec status frame (kwok,
and runtimes with exec bugs, do not carry it reliably). No result means the outcome is unknown.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import structlog
from kubernetes_asyncio import client

from . import exec_wire
from .agent_protocol import (
    AgentProtocolError,
    AgentStreamDecoder,
    Message,
    Output,
    agent_command,
    encode_stdin,
)
from .exec_client import ExecError, ExecTarget, open_exec
from .inputs import ResolvedInputs
from .status import Reason

log = structlog.get_logger(__name__)


@dataclass
class AttemptOutcome:
    stdout: exec_wire.Tail
    stderr: exec_wire.Tail
    exit_code: int | None = None
    signal: int | None = None
    reason: str | None = None  # why there is no exit code
    message: str = ""
    totals: dict[str, int] = field(default_factory=dict)
    resources: dict[str, Any] | None = None
    started: bool = False
    fresh: bool = True  # False when the agent found this attempt already started (reattached)

    @property
    def stdout_bytes(self) -> int:
        return self.totals.get("stdout", self.stdout.total)

    @property
    def stderr_bytes(self) -> int:
        return self.totals.get("stderr", self.stderr.total)


@dataclass(frozen=True)
class AttemptRequest:
    target: ExecTarget
    attempt_dir: str
    python: list[str]
    args: list[str]
    working_dir: str | None
    inputs: ResolvedInputs
    tail_bytes: int
    connect_timeout: float = 30.0

    def agent_request(self) -> dict[str, Any]:
        return {
            "op": "run",
            "dir": self.attempt_dir,
            "python": self.python,
            "args": self.args,
            "env": self.inputs.env,
            "workingDir": self.working_dir,
            "scriptPath": self.inputs.script_path,
            "tail": self.tail_bytes,
        }


async def run_attempt(api: client.ApiClient, req: AttemptRequest) -> AttemptOutcome:
    outcome = AttemptOutcome(stdout=exec_wire.Tail(req.tail_bytes), stderr=exec_wire.Tail(req.tail_bytes))
    agent_stderr = exec_wire.Tail(4096)
    decoder = AgentStreamDecoder()
    result: dict[str, Any] | None = None
    began = time.monotonic()
    try:
        async with open_exec(
            api, req.target, agent_command(req.python), connect_timeout=req.connect_timeout
        ) as stream:
            await stream.write_stdin(encode_stdin(req.agent_request(), req.inputs.script or b""))
            async for channel, data in stream.frames():
                if channel == exec_wire.STDERR:
                    agent_stderr.append(data)
                    continue
                for event in decoder.feed(data):
                    if isinstance(event, Output):
                        (outcome.stdout if event.stream == "stdout" else outcome.stderr).append(event.data)
                    else:
                        result = _on_message(outcome, event) or result
            status = stream.status
    except ExecError as e:
        outcome.reason, outcome.message = Reason.EXEC_ERROR, str(e)
        return outcome
    except AgentProtocolError as e:
        outcome.reason, outcome.message = Reason.EXEC_ERROR, str(e)
        return outcome
    log.debug("attempt stream ended", seconds=round(time.monotonic() - began, 3), status=status)
    if result is not None:
        _apply_result(outcome, result)
    elif outcome.reason is None:
        _explain_missing_result(outcome, status, agent_stderr.text().strip())
    return outcome


def _on_message(outcome: AttemptOutcome, message: Message) -> dict[str, Any] | None:
    kind = message.type
    if kind == "accepted":
        outcome.fresh = bool(message.fields.get("fresh"))
    elif kind == "started":
        outcome.started = True
    elif kind == "result":
        outcome.totals = {k: int(v) for k, v in (message.fields.get("totals") or {}).items()}
        result = message.fields.get("result")
        return result if isinstance(result, dict) else {"error": "the agent sent an empty result"}
    elif kind == "error":
        outcome.reason = message.fields.get("reason") or Reason.EXEC_ERROR
        outcome.message = str(message.fields.get("message", "the agent reported an error"))
    return None


def _apply_result(outcome: AttemptOutcome, result: dict[str, Any]) -> None:
    outcome.resources = result.get("resources")
    code = result.get("exitCode")
    if isinstance(code, int):
        outcome.exit_code = code
        outcome.signal = result.get("signal")
    else:
        outcome.reason = Reason.RESULT_UNKNOWN
        outcome.message = str(result.get("error") or "the agent reported no exit code")


def _explain_missing_result(
    outcome: AttemptOutcome, status: exec_wire.ExecStatus | None, agent_err: str
) -> None:
    if agent_err:
        outcome.reason, outcome.message = Reason.EXEC_ERROR, f"The agent failed in the container: {agent_err}"
    elif status is not None and not status.ok:
        outcome.reason, outcome.message = Reason.EXEC_ERROR, f"exec failed: {status.message}"
    else:
        # A missing status frame, or success without a result, is never taken as success.
        outcome.reason = Reason.RESULT_UNKNOWN
        outcome.message = "The exec stream ended before the script's result arrived."
