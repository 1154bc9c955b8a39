"""A real OpenSSH server on a loopback port, and an ssh client set up to reach it, for multi-node tests.

`ssh_server(root)` starts ``/usr/sbin/sshd`` as the current user (root included) with its own host key,
config and authorized key under ``root``, listening on 127.0.0.1 at a free port. Its client side is an
ssh config (port, the generated key, a known_hosts file holding the server's host key: host keys are
checked, nothing is asked) and a folder ``bin`` holding ``ssh``, which runs the system's ssh with that
config (``ssh -F``). Put ``bin`` first on PATH and every ``ssh HOST`` a launcher runs (DeepSpeed's ssh
check, pdsh's ssh module, Ray's ``ray start`` over ssh) reaches this server, without touching
``~/.ssh``: ssh reads its user config from the passwd entry's home, not from $HOME, so this is the only
way short of editing the real user's files. The hosts it answers to are ``127.0.0.1`` and ``localhost``.

On exit every process the server started (the commands run over ssh, and what they started, in their
own sessions) is killed, then the server.
"""

from __future__ import annotations

import contextlib
import dataclasses
import getpass
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator

import psutil

from tests.support.s3server import free_port

SSHD = "/usr/sbin/sshd"
HOSTS = ("127.0.0.1", "localhost")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SshServer:
    port: int
    """The loopback port sshd listens on."""
    bin_dir: str
    """Folder with the ``ssh`` that uses this server's client config: put it first on PATH."""
    client_config: str
    """The ssh client config (``ssh -F``)."""
    pid: int
    """The listening sshd."""
    log: str
    """sshd's log (``-E``)."""

    def env(self, base: dict) -> dict:
        """``base`` with ``bin_dir`` first on PATH."""
        out = dict(base)
        out["PATH"] = f"{self.bin_dir}:{base.get('PATH', os.defpath)}"
        return out


def _keygen(path: str) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "test", "-f", path], check=True)
    with open(path + ".pub") as f:
        return f.read().strip()


def _write(path: str, text: str, mode: int = 0o644) -> str:
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)
    return path


def _server_config(root: str, port: int) -> str:
    lines = [
        f"Port {port}",
        "ListenAddress 127.0.0.1",
        f"HostKey {root}/host_ed25519",
        f"PidFile {root}/sshd.pid",
        f"AuthorizedKeysFile {root}/authorized_keys",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",
        "StrictModes no",  # the tmp folder's modes are the test's, not a home's
        "PermitRootLogin prohibit-password",
        "PrintMotd no",
        "MaxStartups 50",
        "MaxSessions 50",
        f"SetEnv TMPDIR={tempfile.gettempdir()}",  # the test session's (tests/conftest.py): removed at its end
    ]
    return _write(os.path.join(root, "sshd_config"), "\n".join(lines) + "\n")


def _client_config(root: str, port: int, host_key: str, client_key: str) -> str:
    known = "".join(f"[{host}]:{port} {host_key}\n" for host in HOSTS)
    known_hosts = _write(os.path.join(root, "known_hosts"), known)
    lines = [
        f"Host {' '.join(HOSTS)}",
        f"  Port {port}",
        f"  User {getpass.getuser()}",
        f"  IdentityFile {client_key}",
        "  IdentitiesOnly yes",
        f"  UserKnownHostsFile {known_hosts}",
        "  GlobalKnownHostsFile /dev/null",
        "  StrictHostKeyChecking yes",
        "  BatchMode yes",
        "  LogLevel ERROR",
    ]
    return _write(os.path.join(root, "ssh_config"), "\n".join(lines) + "\n")


def _wait_listening(port: int, proc: subprocess.Popen, log: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            with open(log) as f:
                raise RuntimeError(f"sshd exited with {proc.returncode}: {f.read()[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.1)
    raise RuntimeError(f"sshd did not listen on 127.0.0.1:{port} within {timeout} s")


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and all its descendants (found before any is killed), and wait for them."""
    try:
        top = psutil.Process(pid)
        procs = [*top.children(recursive=True), top]
    except psutil.NoSuchProcess:
        return
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(procs, timeout=10)


@contextlib.contextmanager
def ssh_server(root: str) -> Iterator[SshServer]:
    """sshd on 127.0.0.1 (a free port) with keys and configs under ``root``; everything it ran killed on exit."""
    os.makedirs(root, exist_ok=True)
    host_key = _keygen(os.path.join(root, "host_ed25519"))
    client_pub = _keygen(os.path.join(root, "client_ed25519"))
    _write(os.path.join(root, "authorized_keys"), client_pub + "\n", 0o600)
    port = free_port()
    config = _client_config(root, port, host_key, os.path.join(root, "client_ed25519"))
    bin_dir = os.path.join(root, "bin")
    os.makedirs(bin_dir)
    system_ssh = shutil.which("ssh")
    assert system_ssh, "no ssh client on PATH (apt package openssh-client, launch/setup_env.sh)"
    _write(os.path.join(bin_dir, "ssh"), f'#!/bin/sh\nexec {system_ssh} -F {config} "$@"\n', 0o755)
    log = _write(os.path.join(root, "sshd.log"), "")
    if os.geteuid() == 0:  # sshd as root needs its privilege separation folder (systemd makes it at boot)
        os.makedirs("/run/sshd", exist_ok=True)
    cmd = [SSHD, "-D", "-f", _server_config(root, port), "-E", log]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_listening(port, proc, log)
        yield SshServer(port=port, bin_dir=bin_dir, client_config=config, pid=proc.pid, log=log)
    finally:
        kill_tree(proc.pid)
        proc.wait()


def kill_commands_naming(text: str) -> list[int]:
    """SIGKILL this user's processes whose command line contains ``text`` (a test's own tmp path, which names
    only its own processes); the pids killed. For commands started over ssh, which outlive their ssh session
    when the client side is killed (sshd gives each command a session of its own)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "uids"]):
        with contextlib.suppress(psutil.Error):
            if (
                proc.pid != os.getpid()
                and proc.info["uids"].real == os.getuid()
                and text in " ".join(proc.info["cmdline"] or ())
            ):
                proc.kill()
                found.append(proc)
    psutil.wait_procs(found, timeout=10)
    return [proc.pid for proc in found]
