"""A 2-node Ray cluster started the way the cluster launcher starts one: ``ray start`` run over ssh on each node.

The head (``ray start --head``, no CPUs) is started by ``ssh 127.0.0.1``, the worker (``ray start --address``,
2 CPUs) by ``ssh localhost``, both through a real OpenSSH server on a loopback port (tests/support/sshd.py).
The nodes get what an ssh login gives, not the test's environment: no PYTHONPATH and a home folder as working
directory, so the shard tasks, which all run on the worker node, import this repository's code only through the
``py_modules`` the driver ships (preprocess/job.py). ``ray.cluster_utils`` (tests/preprocess/test_multinode.py)
starts its nodes as children of the test with the test's environment and so cannot show that. The driver is
``preprocess/shard.py --ray-address HEAD:PORT`` on this machine, as on a real cluster's head.

The clusters' processes carry this test's RAY_TMPDIR in their environment; at the end exactly those are killed.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import psutil
import pytest

from pipeline.manifest import read_manifest
from tests.preprocess.fixtures_job import PYTHON, REPO, cli_args, corpus, script_env  # noqa: F401
from tests.support.s3server import free_port
from tests.support.sshd import ssh_server

pytestmark = [pytest.mark.ray, pytest.mark.slow]
RAY = str(Path(PYTHON).parent / "ray")
RAY_ENV = ("RAY_USAGE_STATS_ENABLED=0", "RAY_AUTH_MODE=disabled")


def ray_processes(ray_tmpdir: str) -> list[psutil.Process]:
    """Live processes whose environment carries ``ray_tmpdir`` as RAY_TMPDIR."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("RAY_TMPDIR") == ray_tmpdir:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def node_ports() -> list[str]:
    """Ports one node takes that default to fixed numbers (two nodes on one machine must not share them)."""
    return [f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}"]


def ray_start_over_ssh(host: str, ray_tmpdir: str, args: list[str], env: dict) -> subprocess.CompletedProcess:
    """``ssh HOST env RAY_TMPDIR=... ray start ARGS``: Ray daemonizes, so this returns once the node is up."""
    remote = ["env", f"RAY_TMPDIR={ray_tmpdir}", *RAY_ENV, RAY, "start", "--node-ip-address=127.0.0.1", *args]
    cmd = ["ssh", host, shlex.join(remote)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL)


def test_job_on_ray_nodes_started_over_ssh(corpus, tmp_path):  # noqa: F811
    ray_tmpdir = tempfile.mkdtemp(prefix="vprs", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    try:
        with ssh_server(str(tmp_path / "ssh")) as server:
            env = server.env(script_env())
            gcs = free_port()
            head_args = ["--head", f"--port={gcs}", "--num-cpus=0", "--include-dashboard=false"]
            head_args += [f"--ray-client-server-port={free_port()}", "--disable-usage-stats", *node_ports()]
            head = ray_start_over_ssh("127.0.0.1", ray_tmpdir, head_args, env)
            assert head.returncode == 0 and "Ray runtime started." in head.stdout, head.stdout + head.stderr
            worker_args = [f"--address=127.0.0.1:{gcs}", "--num-cpus=2", "--disable-usage-stats", *node_ports()]
            worker = ray_start_over_ssh("localhost", ray_tmpdir, worker_args, env)
            assert worker.returncode == 0 and "Ray runtime started." in worker.stdout, worker.stdout + worker.stderr

            raylets = [p for p in ray_processes(ray_tmpdir) if p.name() == "raylet"]
            assert len(raylets) == 2, raylets
            for raylet in raylets:  # started by sshd for its login, without the test's environment
                node_env = raylet.environ()
                assert "SSH_CONNECTION" in node_env and "PYTHONPATH" not in node_env, node_env
                assert raylet.cwd() == str(Path.home())

            out = tmp_path / "out"
            driver_env = script_env(RAY_TMPDIR=ray_tmpdir)
            cmd = [
                PYTHON,
                str(REPO / "preprocess/shard.py"),
                *cli_args(corpus, out),
                "--ray-address",
                f"127.0.0.1:{gcs}",
            ]
            job = subprocess.run(cmd, cwd=tmp_path, env=driver_env, capture_output=True, text=True, timeout=300)
            assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
            assert "clips: 12 total, 12 ok, 0 failed" in job.stdout
            assert read_manifest(str(out)).num_samples == 12
    finally:
        leftovers = ray_processes(ray_tmpdir)
        for proc in leftovers:
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(leftovers, timeout=15)
        shutil.rmtree(ray_tmpdir, ignore_errors=True)
