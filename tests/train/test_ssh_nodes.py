"""Two nodes over real ssh, as users start them: DeepSpeed's runner (pdsh) reaches "hosts" 127.0.0.1 and
localhost through an OpenSSH server the test runs on a loopback port (tests/support/sshd.py), 2 CPU ranks
on each (world size 4, gloo).

The first run is ``deepspeed --hostfile H launch/pretrain.sh TRAIN_ARGS`` (the master address found over
ssh, as DeepSpeed does when none is given); it trains and checkpoints. The second is the stand-alone
``launch/pretrain.sh --hostfile H -- TRAIN_ARGS`` with a later max_steps: it resumes from that checkpoint
on the same 4 ranks. The variables the remote ranks need that are not DeepSpeed's own exports go through
DeepSpeed's .deepspeed_env file (named by DS_ENV_FILE), as docs/training.md tells users.
"""

from __future__ import annotations

import os
import re
import shutil
import sys

import pytest

from tests.support.s3server import free_port
from tests.support.sshd import kill_commands_naming, ssh_server
from tests.train.fixtures_train import REPO, env, moving_dataset, shm_buffers, start_ranks
from train.run_outputs import read_metrics

pytestmark = [pytest.mark.deepspeed, pytest.mark.slow]
TINY = "launch/configs/train/tiny.yaml"
DEEPSPEED = os.path.join(os.path.dirname(sys.executable), "deepspeed")
HOSTS = ("127.0.0.1", "localhost")
TRANSCRIPT = os.environ.get("VIDPROXY_SSH_TRANSCRIPT")  # where to copy the launchers' output (the closing note)


def train_steps(run_dir: str) -> list[int]:
    return [r["step"] for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if r["kind"] == "train"]


def launch(cmd: list[str], run_env: dict, run_dir: str, name: str) -> tuple[int, str]:
    """Run one launcher command to its end (waited on by progress); its exit code and output."""
    log_dir = os.path.join(os.path.dirname(run_dir), name)
    os.makedirs(log_dir)
    ranks = start_ranks(cmd, [run_env], log_dir, (run_dir,))
    try:
        code = ranks.wait()
    finally:
        ranks.kill()
        kill_commands_naming(run_dir)  # ranks the remote side started outlive pdsh when it is killed
    with open(ranks.logs[0]) as f:
        return code, f.read()


@pytest.mark.timeout(600)
def test_hostfile_over_ssh_trains_checkpoints_and_resumes(tmp_path):
    assert shutil.which("pdsh"), "no pdsh: DeepSpeed's multi-node runner needs it (launch/setup_env.sh installs it)"
    train = moving_dataset(str(tmp_path / "train"), 32, seed=5, max_samples=4)
    run_dir, port = str(tmp_path / "run"), free_port()
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"{host} slots=2\n" for host in HOSTS))
    remote_env = tmp_path / "deepspeed_env"  # what the ranks on the other "hosts" must get besides PYTHON*
    torch_ext = env()["TORCH_EXTENSIONS_DIR"]
    remote_env.write_text(f"DS_ACCELERATOR=cpu\nTORCH_EXTENSIONS_DIR={torch_ext}\nOMP_NUM_THREADS=1\n")
    train_args = ["--config", TINY, f"data.train=[{train}]", f"run_dir={run_dir}", "data.batch_size=4"]
    train_args += ["data.num_workers=0", "checkpoint.every_steps=2", "log.every_steps=1", "log.plots=false"]
    train_args += ["log.tensorboard=false"]

    with ssh_server(str(tmp_path / "ssh")) as server:
        run_env = server.env(env())
        run_env.pop("PYTHONPATH")  # the launcher and the script find the repository themselves
        run_env["PYTHON"] = sys.executable  # pretrain.sh's interpreter where the checkout has no .venv of its own
        run_env["DS_ENV_FILE"] = str(remote_env)
        first = [DEEPSPEED, "--hostfile", str(hostfile), "--master_port", str(port), "launch/pretrain.sh"]
        code, out1 = launch([*first, *train_args, "max_steps=2"], run_env, run_dir, "first")
        assert code == 0, out1[-8000:]
        run_env["MASTER_PORT"] = str(port)
        second = ["bash", "launch/pretrain.sh", "--hostfile", str(hostfile), "--", *train_args, "max_steps=4"]
        code, out2 = launch(second, run_env, run_dir, "second")
        assert code == 0, out2[-8000:]

    if TRANSCRIPT:
        with open(TRANSCRIPT, "w") as f:
            f.write(f"$ {' '.join(first)} {' '.join(train_args)} max_steps=2\n{out1}\n")
            f.write(f"$ {' '.join(second)} max_steps=4\n{out2}")
    for out in (out1, out2):
        assert f"Running on the following workers: {','.join(HOSTS)}" in out
        assert f"deepspeed_env file = {remote_env}" in out
        pdsh = re.search(r"cmd = (pdsh -S -f 1024 -w \S+ .*)", out)
        assert pdsh and pdsh[1].startswith(f"pdsh -S -f 1024 -w {','.join(HOSTS)} export ")
        assert (
            f"export DS_ACCELERATOR=cpu; export TORCH_EXTENSIONS_DIR={torch_ext}; export OMP_NUM_THREADS=1;" in pdsh[1]
        )
        assert f"cd {REPO}; {os.path.dirname(sys.executable)}/python" in pdsh[1]  # the venv's, by absolute path
        assert " -u -m deepspeed.launcher.launch --world_info=" in pdsh[1] and " --node_rank=%n " in pdsh[1]
        for node, host in enumerate(HOSTS):  # pdsh prefixes each line with the host it came from
            assert re.search(rf"^{re.escape(host)}: .*nnodes=2, num_local_procs=2, node_rank={node}\b", out, re.M)
        assert re.search(r"Using IP address of \S+ for node 127\.0\.0\.1", out)  # the master, found over ssh
    assert re.search(r"resumed from \S+/checkpoints/step000000002", out2)
    assert "resumed from" not in out1
    assert train_steps(run_dir) == [1, 2, 3, 4]
    rows = [r for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if r["kind"] == "train"]
    assert rows[0]["samples_per_s"] / rows[0]["samples_per_s_per_device"] == pytest.approx(4.0)  # world size 4
    for step in (2, 4):
        names = os.listdir(os.path.join(run_dir, "checkpoints", f"step{step:09d}"))
        assert sorted(n for n in names if n.startswith("zero_pp_rank")) == [
            f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(4)
        ]
    assert not shm_buffers(port)
