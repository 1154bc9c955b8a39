"""The job through Ray's own front doors: ``ray job submit`` to a ``ray start --head`` cluster, and
``ray up`` + ``ray submit`` with launch/ray-local.yaml over ssh to localhost.

Both clusters get free ports and their own temp dir; at the end only the processes whose command
line names that temp dir (the ones these tests started) are killed, by pid. The ssh test runs
its own sshd on a free loopback port with a throwaway key and HOME; it is skipped, with the
reason, where sshd/rsync are missing or the tests do not run as root.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from pipeline.manifest import read_manifest
from tests.preprocess.fixtures_job import PYTHON, REPO, cli_args, corpus, script_env  # noqa: F401

pytestmark = [pytest.mark.ray, pytest.mark.slow]
RAY = str(Path(PYTHON).parent / "ray")
SSHD = "/usr/sbin/sshd"

PROXY = """import os, socket, sys, threading
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
def back():
    while data := s.recv(65536):
        os.write(1, data)
    os._exit(0)
threading.Thread(target=back, daemon=True).start()
while data := os.read(0, 65536):
    s.sendall(data)
s.shutdown(socket.SHUT_WR)
threading.Event().wait(30)
"""


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _head_args(temp_dir: str) -> list[str]:
    gcs, dash, client, agent, metrics = _free_ports(5)
    args = [
        f"--port={gcs}",
        f"--dashboard-port={dash}",
        f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent}",
        f"--metrics-export-port={metrics}",
        "--dashboard-host=127.0.0.1",
        "--include-dashboard=true",
        "--num-cpus=2",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    return args, dash


def _kill_started_under(marker: str) -> None:
    """Kill, by pid, the processes whose command line names our private temp dir."""
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline:
            try:
                os.kill(int(entry), signal.SIGKILL)
            except ProcessLookupError:
                pass


def _wait_http(url: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {seconds} s")


def test_ray_job_submit(corpus, tmp_path):
    temp_dir = tempfile.mkdtemp(prefix="vpjob", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    args, dash = _head_args(temp_dir)
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", *args],
        env=script_env(),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "head.log", "w"),
    )
    try:
        _wait_http(f"http://127.0.0.1:{dash}/api/version", 120)
        code = tmp_path / "code"
        for package in ("pipeline", "preprocess"):
            shutil.copytree(REPO / package, code / package, ignore=shutil.ignore_patterns("__pycache__"))
        out = tmp_path / "out"
        cmd = [
            RAY,
            "job",
            "submit",
            "--address",
            f"http://127.0.0.1:{dash}",
            "--working-dir",
            str(code),
            "--",
            "python",
            "preprocess/shard.py",
            *cli_args(corpus, out),
        ]
        proc = subprocess.run(cmd, env=script_env(), capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "clips: 12 total, 12 ok, 0 failed" in proc.stdout
        assert read_manifest(str(out)).num_samples == 12
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(30)
        except subprocess.TimeoutExpired:
            pass
        _kill_started_under(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


# --------------------------------------------------------------------------- ray submit over ssh


def _ssh_missing() -> str | None:
    if os.geteuid() != 0:
        return "ray submit test needs root (the local-provider YAML logs in as root over ssh)"
    for tool in (SSHD, shutil.which("rsync"), shutil.which("ssh"), shutil.which("ssh-keygen")):
        if not tool or not os.path.exists(tool):
            return "sshd, ssh, ssh-keygen and rsync are needed (apt-get install openssh-server rsync)"
    return None


@pytest.fixture
def sshd_localhost(tmp_path):
    """An sshd on a free loopback port that lets a throwaway key in as root, with a throwaway HOME."""
    missing = _ssh_missing()
    if missing:
        pytest.skip(missing)
    base = Path(tempfile.mkdtemp(prefix="vpssh", dir="/tmp"))
    home = base / "home"
    (home / ".ssh").mkdir(parents=True)
    key = base / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(base / "host_key")], check=True)
    shutil.copy(f"{key}.pub", base / "authorized_keys")
    (home / ".bashrc").write_text(
        f'export PATH="{Path(PYTHON).parent}:$PATH" VIDPROXY_ROOT="{REPO}" '
        "RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled\n"
    )
    (base / "proxy.py").write_text(PROXY)
    (port,) = _free_ports(1)
    (base / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {base}/host_key\nPidFile {base}/sshd.pid\n"
        f"AuthorizedKeysFile {base}/authorized_keys\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n"
        f"UsePAM no\nStrictModes no\nSetEnv HOME={home} TMPDIR={tempfile.gettempdir()}\nMaxStartups 50\n"
    )
    os.makedirs("/run/sshd", exist_ok=True)
    sshd = subprocess.Popen(
        [SSHD, "-D", "-f", str(base / "sshd_config"), "-E", str(base / "sshd.log")], start_new_session=True
    )
    time.sleep(0.5)
    if sshd.poll() is not None:
        pytest.skip(f"sshd could not start: {(base / 'sshd.log').read_text()[-500:]}")
    yield {"base": base, "home": home, "key": key, "proxy": f"{PYTHON} {base}/proxy.py {port}"}
    sshd.kill()
    sshd.wait(10)
    shutil.rmtree(base, ignore_errors=True)


def _test_cluster_yaml(ssh: dict, temp_dir: str) -> tuple[Path, str]:
    """launch/ray-local.yaml with this test's key, ssh proxy, ports and no shared-state commands."""
    cfg = yaml.safe_load((REPO / "launch/ray-local.yaml").read_text())
    name = f"vidproxy-test-{uuid.uuid4().hex[:8]}"
    args, _ = _head_args(temp_dir)
    cfg.update(cluster_name=name, file_mounts={}, setup_commands=[])
    cfg["auth"].update(ssh_private_key=str(ssh["key"]), ssh_proxy_command=ssh["proxy"])
    cfg["head_start_ray_commands"] = [
        " ".join(["ray", "start", "--head", *args, "--autoscaling-config=~/ray_bootstrap_config.yaml"])
    ]
    path = ssh["base"] / "cluster.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, name


def _ssh_control_folder(cluster_name: str) -> Path:
    """Where Ray's ssh command runner keeps a cluster's ControlMaster sockets: a path fixed in
    ray/autoscaler/_private/command_runner.py (/tmp/ray_ssh_<user hash>/<cluster name hash>), not under TMPDIR."""
    user, cluster = (hashlib.sha256(text.encode()).hexdigest()[:10] for text in (getpass.getuser(), cluster_name))
    return Path(f"/tmp/ray_ssh_{user}/{cluster}")


def test_ray_submit_with_the_local_provider_yaml(corpus, sshd_localhost, tmp_path):
    temp_dir = tempfile.mkdtemp(prefix="vpsub", dir="/tmp")
    cluster, name = _test_cluster_yaml(sshd_localhost, temp_dir)
    control = _ssh_control_folder(name)  # the cluster name is this test's own: so is this folder
    shared = control.parent.exists()
    env = script_env()
    try:
        up = subprocess.run(
            [RAY, "up", "-y", "--no-config-cache", str(cluster)], env=env, capture_output=True, text=True, timeout=240
        )
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        out = tmp_path / "out"
        cmd = [RAY, "submit", str(cluster), str(REPO / "preprocess/shard.py"), "--", *cli_args(corpus, out)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "clips: 12 total, 12 ok, 0 failed" in proc.stdout
        assert read_manifest(str(out)).num_samples == 12
        assert (sshd_localhost["home"] / "shard.py").exists(), "ray submit did not ship the script over ssh"
    finally:
        _kill_started_under(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        for leftover in Path(tempfile.gettempdir(), "ray").glob(f"cluster-{name}*"):  # the local provider's lock
            leftover.unlink(missing_ok=True)
        shutil.rmtree(control, ignore_errors=True)
        if not shared:
            with contextlib.suppress(OSError):  # not empty: another cluster's sockets are there now
                control.parent.rmdir()
