"""What the script receives: its source from each place, args, env, and secrets kept out of sight."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from kubernetes_asyncio import client

from pythontask.spec import MAX_INLINE_BYTES
from support.cluster import Cluster
from support.operator import OperatorProcess
from support.pods import ready_pod
from support.tasks import TaskClient


async def test_a_one_mib_inline_script_runs(core: client.CoreV1Api, tasks: TaskClient) -> None:
    await ready_pod(core, tasks.namespace)
    head = "import hashlib\nblob = '"
    tail = "'\nprint(len(blob), hashlib.sha256(blob.encode()).hexdigest()[:12])\n"
    filler = "z" * (MAX_INLINE_BYTES - len(head) - len(tail))
    script = head + filler + tail
    assert len(script.encode()) == MAX_INLINE_BYTES
    status = await tasks.run("big-script", {"target": {"podName": "worker"}, "script": {"inline": script}})
    expected = f"{len(filler)} {hashlib.sha256(filler.encode()).hexdigest()[:12]}\n"
    assert (status["phase"], status["output"]["stdout"]) == ("Succeeded", expected)


async def test_a_script_from_a_config_map(core: client.CoreV1Api, tasks: TaskClient) -> None:
    await ready_pod(core, tasks.namespace)
    await core.create_namespaced_config_map(
        tasks.namespace, {"metadata": {"name": "scripts"}, "data": {"job.py": "print('from a ConfigMap')\n"}}
    )
    spec = {
        "target": {"podName": "worker"},
        "script": {"configMapKeyRef": {"name": "scripts", "key": "job.py"}},
    }
    status = await tasks.run("from-cm", spec)
    assert (status["phase"], status["output"]["stdout"]) == ("Succeeded", "from a ConfigMap\n")


async def test_a_script_file_inside_the_container(
    core: client.CoreV1Api, tasks: TaskClient, tmp_path: Path
) -> None:
    # kwok's "container" is this machine, so a file here is a file in the container.
    script = tmp_path / "job.py"
    script.write_text("import sys\nprint('from a file', sys.argv[1:])\n")
    await ready_pod(core, tasks.namespace)
    spec = {"target": {"podName": "worker"}, "script": {"path": str(script)}, "args": ["a"]}
    status = await tasks.run("from-path", spec)
    assert (status["phase"], status["output"]["stdout"]) == ("Succeeded", "from a file ['a']\n")


async def test_args_env_and_working_dir_reach_the_script(
    core: client.CoreV1Api, tasks: TaskClient, tmp_path: Path
) -> None:
    await ready_pod(core, tasks.namespace)
    await core.create_namespaced_config_map(
        tasks.namespace, {"metadata": {"name": "cfg"}, "data": {"region": "eu-1"}}
    )
    script = (
        "import json, os, sys\n"
        "print(json.dumps({'argv': sys.argv[1:], 'cwd': os.getcwd(),"
        " 'unbuffered': os.environ['PYTHONUNBUFFERED'],"
        " 'env': {k: os.environ.get(k) for k in ('BATCH_SIZE', 'REGION', 'EMPTY')},"
        " 'stdin': sys.stdin.read()}))\n"
    )
    spec = {
        "target": {"podName": "worker"},
        "script": {"inline": script},
        "args": ["--date", "2026-11-20", "with space", "ünïcode"],
        "env": [
            {"name": "BATCH_SIZE", "value": "500"},
            {"name": "REGION", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "region"}}},
            {"name": "EMPTY", "value": ""},
        ],
        "workingDir": str(tmp_path),
    }
    status = await tasks.run("args-env", spec)
    assert status["phase"] == "Succeeded", status
    seen = json.loads(status["output"]["stdout"])
    assert seen == {
        "argv": ["--date", "2026-11-20", "with space", "ünïcode"],
        "cwd": str(tmp_path),
        "unbuffered": "1",
        "env": {"BATCH_SIZE": "500", "REGION": "eu-1", "EMPTY": ""},
        "stdin": "",  # never stdin on the user's script
    }


async def test_a_secret_env_value_appears_nowhere_in_status_events_or_logs(
    cluster: Cluster, core: client.CoreV1Api, tasks: TaskClient, operator: OperatorProcess
) -> None:
    await ready_pod(core, tasks.namespace)
    secret = "s3cr3t-Tok3n-42"
    await core.create_namespaced_secret(
        tasks.namespace, {"metadata": {"name": "creds"}, "stringData": {"token": secret}}
    )
    script = (
        "import os, sys\ntoken = os.environ['TOKEN']\n"
        "print('got', len(token), token)\nsys.exit('bad ' + token)\n"
    )
    spec = {
        "target": {"podName": "worker"},
        "script": {"inline": script},
        "env": [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}}],
        # One retry: the Retrying message and its Warning Event carry the first attempt's failure.
        "retry": {"limit": 1, "backoff": {"initial": "1s"}},
    }
    status = await tasks.run("secret", spec)
    assert (status["phase"], status["attempts"]) == ("Failed", 2)
    assert status["output"]["stdout"] == f"got {len(secret)} ***\n"  # the script got it; status shows a mask
    assert status["output"]["stderr"] == "bad ***\n"
    everything = cluster.kubectl("get", "pythontask", "secret", "-n", tasks.namespace, "-o", "json").stdout
    everything += cluster.kubectl("get", "events", "-n", tasks.namespace, "-o", "json").stdout
    assert "Retrying" in everything or "retry" in everything.lower()
    assert secret not in everything
    assert secret not in operator.log_path.read_text(errors="replace")
