"""launch/pretrain.sh as DeepSpeed users start it, and the DeepSpeed settings passthrough (zero.extra).

The two launcher runs are the commands of docs/training.md, run literally on 2 CPU ranks: the
``deepspeed`` launcher starting the script under Python (``python -u launch/pretrain.sh
--local_rank=N ...``) and under bash (``--no_python``), the second with a ``--deepspeed_config``
fragment that offloads the optimizer to the CPU (DeepSpeedCPUAdam).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from tests.support.s3server import free_port
from tests.train.fixtures_train import PYTHON, REPO, env, moving_dataset, shm_buffers
from train.config import load_config
from train.run_outputs import read_metrics

SCRIPT = os.path.join(REPO, "launch", "pretrain.sh")
TINY = "launch/configs/train/tiny.yaml"
DEEPSPEED = os.path.join(os.path.dirname(sys.executable), "deepspeed")


def run(cmd: list[str], rank_env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, cwd=REPO, env=rank_env or env(), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


@pytest.mark.slow  # five runs of the script, two of them import train.main in a fresh Python: ~5-9 s
def test_one_file_is_a_bash_script_and_a_python_program():
    assert run(["bash", "-n", SCRIPT]).returncode == 0
    with open(SCRIPT) as f:
        compile(f.read(), SCRIPT, "exec", dont_inherit=True)  # a SyntaxError (or warning, under -W error) fails
    usage = run(["bash", SCRIPT, "--help"])
    assert usage.returncode == 0 and usage.stderr == ""
    assert (
        "deepspeed [--hostfile H] [--num_nodes N] [--num_gpus G] [--master_port P] launch/pretrain.sh" in usage.stdout
    )
    assert "--node-rank R" in usage.stdout and "How one file" not in usage.stdout
    wrong = run(["bash", SCRIPT, "--config", TINY])
    assert wrong.returncode == 2 and "unknown option --config (train.main arguments go after --" in wrong.stderr
    # a rank: under Python (the deepspeed launcher's default) and under bash with --local_rank (--no_python)
    for cmd in ([PYTHON, SCRIPT, "--local_rank=0", "--help"], ["bash", SCRIPT, "--local_rank=1", "--help"]):
        rank = run(cmd)
        assert rank.returncode == 0, rank.stderr
        assert "--dry-run" in rank.stdout and "zero.extra" in rank.stdout  # train.main's help
    misplaced = run([PYTHON, SCRIPT, "--local_rank=0", "--gpus", "2", "--", "--config", TINY])
    assert misplaced.returncode == 2
    assert "--gpus is an option of the stand-alone launch/pretrain.sh" in misplaced.stderr
    assert "deepspeed --num_gpus" in misplaced.stderr


def test_rank_arguments():
    from launch.pretrain_rank import rank_args

    assert rank_args(["--local_rank=3", "--config", "c.yaml", "a=1"]) == ["--config", "c.yaml", "a=1"]
    assert rank_args(["--local_rank", "3", "--", "--config", "c.yaml"]) == ["--config", "c.yaml"]
    assert rank_args(["--local-rank=0", "--deepspeed", "--deepspeed_config", "ds.json", "--dry-run"]) == [
        "--dry-run",
        "zero.extra=ds.json",
    ]
    assert rank_args(["--deepspeed_config=ds.yaml", "run_dir=r"]) == ["run_dir=r", "zero.extra=ds.yaml"]
    assert rank_args(["--deepspeed", "ds.json", "run_dir=r"]) == ["run_dir=r", "zero.extra=ds.json"]  # HF's form
    with pytest.raises(ValueError, match="give the DeepSpeed fragment once"):
        rank_args(["--deepspeed_config", "a.json", "zero.extra.seed=1"])
    with pytest.raises(ValueError, match="--deepspeed_config needs a file"):
        rank_args(["--deepspeed_config"])
    with pytest.raises(ValueError, match="under the deepspeed launcher give deepspeed --master_port"):
        rank_args(["--master-port", "29500", "--config", "c.yaml"])


def test_deepspeed_fragment_is_merged_and_conflicts_are_named(tmp_path):
    from train.engine import ds_config, merge_extra

    fragment = {
        "zero_optimization": {"offload_optimizer": {"device": "cpu", "pin_memory": True}, "stage": "auto"},
        "train_micro_batch_size_per_gpu": "auto",
        "comms_logger": {"enabled": True, "verbose": False},
        "wall_clock_breakdown": True,
    }
    as_json = tmp_path / "ds.json"
    as_json.write_text(json.dumps(fragment, indent="\t"))  # tabs: JSON, not YAML
    as_yaml = tmp_path / "ds.yaml"
    as_yaml.write_text(yaml.safe_dump(fragment))
    for path in (as_json, as_yaml):
        cfg = load_config(TINY, ["run_dir=x", "zero.stage=2", f"zero.extra={path}"])
        assert cfg.zero.extra == fragment  # the content, so config.yaml records it
        ds = ds_config(cfg, world_size=2)
        assert ds["zero_optimization"]["stage"] == 2 and ds["train_micro_batch_size_per_gpu"] == 16
        assert ds["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
        assert ds["zero_optimization"]["contiguous_gradients"] is True and ds["comms_logger"]["enabled"] is True
        assert ds["wall_clock_breakdown"] is True and ds["gradient_clipping"] == 5.0
    dotted = load_config(TINY, ["run_dir=x", "zero.extra.zero_optimization.offload_param.device=cpu"])
    assert dotted.zero.extra == {"zero_optimization": {"offload_param": {"device": "cpu"}}}
    assert merge_extra({"a": {"b": 1, "c": 2}}, {"a": {"c": 3, "d": "auto"}, "e": {"f": "auto"}}) == {
        "a": {"b": 1, "c": 3},
        "e": {},
    }

    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps(
            {
                "train_micro_batch_size_per_gpu": 8,
                "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}},
                "bf16": {"enabled": True},
                "optimizer": {"type": "AdamW", "params": {"lr": "auto"}},
            }
        )
    )
    with pytest.raises(ValueError) as refused:
        load_config(TINY, ["run_dir=x", f"zero.extra={bad}"])
    assert str(refused.value) == (
        "zero.extra: keys the config sets: train_micro_batch_size_per_gpu -> use data.batch_size; "
        "zero_optimization.stage -> use zero.stage; bf16.enabled -> use zero.precision; "
        "optimizer.type -> use optim.* (the trainer builds AdamW; DeepSpeedCPUAdam under "
        'zero_optimization.offload_optimizer) (or give "auto")'
    )
    with pytest.raises(ValueError, match="gradient_clipping -> use optim.grad_clip"):
        load_config(TINY, ["run_dir=x", "zero.extra.gradient_clipping=1.0"])
    with pytest.raises(ValueError, match="zero.extra: '.*missing.json' is not a file"):
        load_config(TINY, ["run_dir=x", f"zero.extra={tmp_path / 'missing.json'}"])
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        load_config(TINY, ["run_dir=x", f"zero.extra={tmp_path / 'list.yaml'}"])


def test_cpu_adam_steps_as_torch_adamw():
    """Under optimizer offload the trainer's AdamW groups (lr multipliers, decay) move to DeepSpeedCPUAdam."""
    from train.config import OptimConfig
    from train.engine import _on_cpu_adam
    from train.optim import build_optimizer, build_scheduler

    def model():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5))
        net.register_parameter("proxy_tokens", torch.nn.Parameter(torch.randn(3, 5)))
        return net

    cfg = OptimConfig(lr=1e-2, embedding_lr_mul=30.0, weight_decay=0.1, warmup_fraction=0.25)
    models = (model(), model())
    torch_opt = build_optimizer(models[0], cfg)
    torch_sched = build_scheduler(torch_opt, 8, cfg)
    to_move = build_optimizer(models[1], cfg)
    cpu_opt, cpu_sched = _on_cpu_adam(to_move, build_scheduler(to_move, 8, cfg))
    assert type(cpu_opt).__name__ == "DeepSpeedCPUAdam"
    for step in range(4):
        for net, opt, sched in ((models[0], torch_opt, torch_sched), (models[1], cpu_opt, cpu_sched)):
            torch.manual_seed(step)
            loss = (net(torch.randn(4, 6)) + net.proxy_tokens.sum(0)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert [g["lr"] for g in torch_opt.param_groups] == pytest.approx([g["lr"] for g in cpu_opt.param_groups])


@pytest.fixture(scope="module")
def train_data(tmp_path_factory) -> str:
    return moving_dataset(str(tmp_path_factory.mktemp("launch") / "train"), 16, seed=5, max_samples=4)


def launcher_env() -> dict:
    """The test environment without PYTHONPATH: the script finds the repository itself."""
    out = env()
    out.pop("PYTHONPATH", None)
    return out


def train_rows(run_dir: str) -> list[dict]:
    return [r for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if r["kind"] == "train"]


@pytest.mark.deepspeed
@pytest.mark.timeout(300)
def test_deepspeed_launcher_runs_the_script(tmp_path, train_data):
    """deepspeed --num_gpus 2 launch/pretrain.sh TRAIN_ARGS, literally: 2 CPU ranks (CPU accelerator)."""
    run_dir, port = str(tmp_path / "run"), free_port()
    cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(port), "launch/pretrain.sh", "--config", TINY]
    cmd += [f"data.train=[{train_data}]", f"run_dir={run_dir}", "max_steps=2", "data.batch_size=4"]
    cmd += ["data.num_workers=0", "log.every_steps=1", "log.plots=false", "log.tensorboard=false"]
    out = run(cmd, launcher_env(), timeout=280)
    assert out.returncode == 0, (out.stdout + out.stderr)[-6000:]
    assert "'-u', 'launch/pretrain.sh', '--local_rank=1'" in out.stdout + out.stderr  # the launcher's own command
    rows = train_rows(run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["samples_per_s"] / rows[0]["samples_per_s_per_device"] == pytest.approx(2.0)
    assert os.path.exists(os.path.join(run_dir, "checkpoints", "step000000002"))
    assert not shm_buffers(port)


@pytest.mark.deepspeed
@pytest.mark.timeout(400)
def test_no_python_launcher_with_cpu_optimizer_offload(tmp_path, train_data):
    """deepspeed --no_python: each rank runs the script under bash; --deepspeed_config offloads the optimizer."""
    fragment = tmp_path / "offload.json"
    fragment.write_text(json.dumps({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}))
    run_dir, port = str(tmp_path / "run"), free_port()
    cmd = [DEEPSPEED, "--no_python", "--num_gpus", "2", "--master_port", str(port), "launch/pretrain.sh"]
    cmd += ["--deepspeed_config", str(fragment), "--config", TINY, f"data.train=[{train_data}]", f"run_dir={run_dir}"]
    cmd += ["zero.stage=2", "max_steps=3", "data.batch_size=4", "data.num_workers=0", "log.every_steps=1"]
    cmd += ["log.plots=false", "log.tensorboard=false"]
    out = run(cmd, launcher_env(), timeout=380)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-6000:]
    assert "spawned with command: ['launch/pretrain.sh', '--local_rank=0'" in log  # no python in front
    assert "optimizer offload to cpu: DeepSpeedCPUAdam" in log
    with open(os.path.join(run_dir, "ds_config.json")) as f:
        ds = json.load(f)
    assert ds["zero_optimization"]["offload_optimizer"] == {"device": "cpu"} and ds["zero_optimization"]["stage"] == 2
    with open(os.path.join(run_dir, "config.yaml")) as f:
        assert yaml.safe_load(f)["zero"]["extra"] == {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}
    rows = train_rows(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["loss"] > 0 for r in rows)
    assert rows[0]["lr"] > rows[-1]["lr"] > 0  # the trainer's schedule drives DeepSpeedCPUAdam
    assert os.path.exists(os.path.join(run_dir, "checkpoints", "step000000003"))
