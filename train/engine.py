"""The only module that imports deepspeed: config dict, initialisation, checkpoints, collectives.

Everything else sees a plain ``nn.Module`` plus the small API below.

* `ds_config` resolves the precision (bf16 on GPU / fp32 on CPU) and builds the DeepSpeed JSON with
  `train.config.deepspeed_json` (plain data, no deepspeed import), then merges the settings of
  ``zero.extra`` over it (`merge_extra`); `write_ds_config` saves it to the run folder.
* `save_checkpoint` must be called by every rank (DeepSpeed hangs otherwise). DeepSpeed writes
  ``client_state`` from rank 0 only, so each rank's own state (data position, RNG states) is
  all-gathered first and stored as a list indexed by rank. Only the newest ``keep_last``
  checkpoints are kept.
* `clamp_param_` clamps a parameter in the optimiser's fp32 master copy *and* the model copy, for
  ZeRO 1/2/3 (clamping only ``param.data`` would be undone by the next step's master update; under
  ZeRO-3 both the partition and a still-gathered copy; tests/train/test_logit_clamp.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import sys

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from train.config import TrainConfig, deepspeed_json
from train.run_layout import MODEL_STATES, CheckpointFolder, RunLayout

logger = logging.getLogger(__name__)


def device_type() -> str:
    """``cuda``, ``cpu``, ... as DeepSpeed's accelerator (DS_ACCELERATOR) sees it."""
    return get_accelerator().device_name()


def current_device() -> torch.device:
    return torch.device(get_accelerator().current_device_name())


def use_own_ninja() -> None:
    """Build DeepSpeed's ops with the ninja installed next to this interpreter (the venv's, a DeepSpeed dependency).

    torch runs whichever ``ninja`` comes first on PATH. Two versions (pip's 1.13 in the venv, Debian's 1.11) hash
    a build command differently, so processes started with and without the venv's bin on PATH rebuilt the shared
    CPU comm op for each other, once a minute while tests ran, holding the build lock long enough to stall ranks.
    """
    here = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if os.path.exists(os.path.join(here, "ninja")) and path.split(os.pathsep)[0] != here:
        os.environ["PATH"] = here + os.pathsep + path


def init_distributed() -> tuple[int, int]:
    """Join the process group the launcher set up (env RANK/WORLD_SIZE/MASTER_*); returns (rank, world)."""
    use_own_ninja()
    deepspeed.init_distributed(
        dist_backend=get_accelerator().communication_backend_name(), auto_mpi_discovery=False, verbose=False
    )
    rank = dist.get_rank()
    if device_type() == "cpu":
        _unlink_shm_buffer(rank)
    else:
        get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return rank, dist.get_world_size()


def _unlink_shm_buffer(rank: int) -> None:
    """Remove the name of this rank's DeepSpeed CPU comm buffer once every rank has mapped it.

    When all ranks share one node, DeepSpeed's CPU comm op (built for the CPU accelerator) creates a 69 MB
    POSIX shared-memory file per rank, named after the master address and port, and never unlinks
    it: every run would leave ``world_size`` of them in /dev/shm (RAM) until reboot. After a
    barrier every rank holds its mappings, so the names can go; the memory is freed at exit,
    also when a rank is killed.
    """
    dist.barrier()
    name = "deepspeed_allreduce_buffer_{}_{}_{}_{}".format(
        os.getuid(), os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", ""), rank
    )
    with contextlib.suppress(FileNotFoundError):  # several nodes: no buffer
        os.unlink(os.path.join("/dev/shm", name))


def use_bf16(cfg: TrainConfig) -> bool:
    if cfg.zero.precision == "auto":
        return device_type() != "cpu"
    return cfg.zero.precision == "bf16"


def ds_config(cfg: TrainConfig, world_size: int) -> dict:
    """The DeepSpeed JSON for this run: `train.config.deepspeed_json` (every modelled value explicit)
    with ``zero.extra`` merged over it (train/config.py refused its modelled keys at load)."""
    return merge_extra(deepspeed_json(cfg, world_size, bf16=use_bf16(cfg)), cfg.zero.extra or {})


def merge_extra(base: dict, extra: dict) -> dict:
    """``extra`` merged over ``base``: mappings key by key, anything else replaced; an "auto" value
    (the Hugging Face convention) leaves ``base``'s value, or DeepSpeed's default where base has none."""
    out = dict(base)
    for key, value in extra.items():
        if value == "auto":
            continue
        if isinstance(value, dict):
            below = out.get(key)
            out[key] = merge_extra(below if isinstance(below, dict) else {}, value)
        else:
            out[key] = value
    return out


def offloads_optimizer(config: dict) -> bool:
    """Whether ZeRO-Offload keeps the optimizer (and its step) on the CPU or NVMe."""
    offload = config.get("zero_optimization", {}).get("offload_optimizer") or {}
    return offload.get("device", "none") in ("cpu", "nvme")


def write_ds_config(config: dict, run: RunLayout) -> str:
    os.makedirs(run.root, exist_ok=True)
    with open(run.ds_config, "w") as f:
        json.dump(config, f, indent=1, sort_keys=True)
    return run.ds_config


def initialize(module: torch.nn.Module, optimizer, scheduler, config: dict, external_params=()):
    """deepspeed.initialize with a client optimizer (torch AdamW: no compiled op on CPU).

    ``external_params``: parameters read outside their owner's forward; under ZeRO-3 they are
    registered on ``module`` so they are gathered for its whole forward. Under optimizer offload
    the same groups and schedule move to DeepSpeedCPUAdam (DeepSpeed refuses torch's AdamW there
    unless the config says ``zero_force_ds_cpu_optimizer: false``).
    """
    if offloads_optimizer(config) and config.get("zero_force_ds_cpu_optimizer", True):
        optimizer, scheduler = _on_cpu_adam(optimizer, scheduler)
        logger.info(
            "optimizer offload to %s: DeepSpeedCPUAdam", config["zero_optimization"]["offload_optimizer"]["device"]
        )
    _describe_for_universal(module)
    if config["zero_optimization"]["stage"] == 3:
        for param in external_params:
            deepspeed.zero.register_external_parameter(module, param)
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=scheduler, config=config, dist_init_required=False
    )
    return engine


def _describe_for_universal(module: torch.nn.Module) -> None:
    """What DeepSpeed's universal conversion (`to_universal`) must know of the model, saved with every checkpoint:
    its 0-dim parameters (CLIP's logit_scale) are whole on every rank: the conversion's concatenation of slices
    cannot take a 0-dim tensor."""
    from deepspeed.checkpoint.constants import (
        TP_REPLICATED_PARAMETER_PATTERNS,
        UNIVERSAL_CHECKPOINT_INFO,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    scalars = [f"^{re.escape(name)}$" for name, param in module.named_parameters() if param.dim() == 0]
    info = {
        UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        TP_REPLICATED_PARAMETER_PATTERNS: scalars,
    }
    object.__setattr__(module, UNIVERSAL_CHECKPOINT_INFO, info)


def _on_cpu_adam(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR):
    """DeepSpeedCPUAdam (AdamW mode) with ``optimizer``'s groups and hyper-parameters, and the same
    LambdaLR schedule on it. DeepSpeed compiles its CPU Adam op on first use (TORCH_EXTENSIONS_DIR)."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    if not isinstance(optimizer, torch.optim.AdamW) or not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        raise TypeError(f"optimizer offload expects AdamW and LambdaLR, got {type(optimizer)}, {type(scheduler)}")
    keep = ("params", "weight_decay", "lr_mul", "name", "betas", "eps")
    groups = [{k: v for k, v in g.items() if k in keep} | {"lr": g["initial_lr"]} for g in optimizer.param_groups]
    defaults = optimizer.defaults
    cpu_adam = DeepSpeedCPUAdam(
        groups,
        lr=defaults["lr"],
        betas=defaults["betas"],
        eps=defaults["eps"],
        weight_decay=defaults["weight_decay"],
        adamw_mode=True,
    )
    return cpu_adam, torch.optim.lr_scheduler.LambdaLR(cpu_adam, scheduler.lr_lambdas)


# ----------------------------------------------------------------------------- parameters


@torch.no_grad()
def clamp_param_(param: torch.nn.Parameter, low: float, high: float) -> None:
    """Clamp a parameter in place in the fp32 master copy *and* the model copy (ZeRO 1/2/3).

    Clamping is elementwise, so each rank clamps only the fragments it holds: no collective.
    """
    if hasattr(param, "ds_id"):  # ZeRO-3: partitioned master and model copies (padding is 0)
        master, _ = param._z3_optimizer._get_fp32_opt_state_partition(param, release_swap_buffers=True)
        master.data.clamp_(low, high)
        param.ds_tensor.data.clamp_(low, high)
    else:
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is not None:  # ZeRO-1/2: this rank's slice of the fp32 master partition
            mapping.get_hp_fragment().data.clamp_(low, high)
    # ZeRO-3 keeps a small (persistent) parameter gathered after the step and the next forward uses
    # that copy as it is; empty when only the partition is held
    param.data.clamp_(low, high)


@torch.no_grad()
def read_param(param: torch.nn.Parameter) -> float:
    """Value of a scalar parameter (gathers it under ZeRO-3; call on every rank)."""
    if hasattr(param, "ds_id"):
        with deepspeed.zero.GatheredParameters([param]):
            return float(param.data.float().reshape(-1)[0])
    return float(param.data.float().reshape(-1)[0])


# ----------------------------------------------------------------------------- collectives


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped tensors from all ranks along dim 0 (no autograd)."""
    world = dist.get_world_size()
    if world == 1:
        return tensor
    out = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(out, tensor.contiguous())
    return torch.cat(out)


def all_gather_objects(obj) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce(value: float, op: str = "max") -> float:
    """Max or sum of a number over ranks."""
    tensor = torch.tensor([value], dtype=torch.float64, device=current_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return float(tensor[0])


def barrier() -> None:
    dist.barrier()


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(
    engine, folder: CheckpointFolder, step: int, rank_state: dict, shared_state: dict, keep_last: int
) -> str:
    """Collective: all ranks save; ``rank_state`` of every rank ends up in ``client_state['ranks']``."""
    tag = folder.tag(step)
    client_state = {"ranks": all_gather_objects(rank_state), **shared_state}
    engine.save_checkpoint(folder.path, tag=tag, client_state=client_state)
    barrier()
    if dist.get_rank() == 0:
        for old in folder.tags()[:-keep_last]:
            shutil.rmtree(folder.tag_dir(old), ignore_errors=True)
            logger.info("removed old checkpoint %s", old)
        shutil.rmtree(folder.universal_root, ignore_errors=True)  # a resume's conversion: no longer the newest
    barrier()
    logger.info("saved checkpoint %s", folder.tag_dir(tag))
    return tag


def consolidated_state_dict(tag_dir: str) -> dict[str, torch.Tensor]:
    """The fp32 weights of a ZeRO checkpoint tag folder, gathered from every rank's partition.

    DeepSpeed's own zero_to_fp32 reads the partitions from each rank's optimizer file; it prints its
    progress, sent to stderr so that a command's stdout stays its result (train/evaluate.py).
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    folder, tag = os.path.split(os.path.abspath(tag_dir))
    with contextlib.redirect_stdout(sys.stderr):
        return get_fp32_state_dict_from_zero_checkpoint(folder, tag=tag)


def saved_world_size(folder: CheckpointFolder) -> int | None:
    """How many data-parallel ranks saved the newest checkpoint (its ZeRO optimizer files), or None without one."""
    tag = folder.latest_tag()
    if tag is None or not os.path.isdir(folder.tag_dir(tag)):
        return None
    return len(folder.optimizer_state_files(tag)) or None


def to_universal(folder: CheckpointFolder) -> str:
    """Collective: rank 0 converts the newest checkpoint to DeepSpeed's universal format (once; kept under
    ``checkpoints/universal/<tag>``), every rank waits; returns the folder its tag lives in.

    A universal checkpoint holds each parameter's fp32 weights and optimizer moments whole, so any number of
    ranks under any ZeRO stage can load it (DeepSpeed's ds_to_universal, run in-process with one worker).
    """
    tag = folder.latest_tag()
    root = folder.universal_root
    done = os.path.join(root, tag, ".complete")
    if dist.get_rank() == 0 and not os.path.exists(done):
        _convert_universal(folder.tag_dir(tag), os.path.join(root, tag))
        open(done, "w").close()
    barrier()
    return root


def _convert_universal(source: str, target: str) -> None:
    import argparse

    from deepspeed.checkpoint import ds_to_universal

    shutil.rmtree(target, ignore_errors=True)
    args = argparse.Namespace(
        input_folder=source,
        output_folder=target,
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    logger.info("converting %s to a universal checkpoint in %s", source, target)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # its progress lines
            ds_to_universal.main(args)
    except (RuntimeError, AssertionError, KeyError, ValueError) as exc:
        raise RuntimeError(
            f"{source}: cannot be converted to DeepSpeed's universal form to resume at another world size "
            f"({type(exc).__name__}: {exc}); a checkpoint saved before 0-dim parameters were recorded as "
            "replicated cannot: resume it at the world size that saved it"
        ) from exc


def load_universal(engine, universal_root: str, tag: str) -> dict:
    """Load a universal checkpoint (`to_universal`) into an engine of any world size and ZeRO stage; return the
    checkpoint's client state.

    Each trained parameter's fp32 master weights and Adam moments go in through DeepSpeed's documented
    ``safe_set_full_fp32_param`` / ``safe_set_full_optimizer_state`` (each rank keeps its own partition), the
    model copy is set to the same fp32 values, and the Adam step, lr scheduler and DeepSpeed's counters come
    from the checkpoint's model-states file. DeepSpeed's own universal loader (``checkpoint.load_universal``)
    fails on a 0-dim parameter such as CLIP's logit_scale (``chunk`` of a 0-dim tensor) and, under ZeRO-1/2, on a
    rank that holds none of a parameter group smaller than the world size (docs/design.md). Frozen parameters
    (``model.lock_text``) are not in the optimizer: they keep the values they were built with, as in the run.
    """
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state  # ZeRO-1/2

    folder = os.path.join(universal_root, tag)
    _init_adam_state(engine.optimizer)
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:  # ZeRO-1/2: link the Adam moments to the parameters' fragments (DeepSpeed does it at a step)
        link()
    step = None
    for name, param in engine.module.named_parameters():
        if not param.requires_grad:
            continue
        shape = param.ds_shape if hasattr(param, "ds_id") else param.shape
        values = {key: _universal_tensor(folder, name, key).reshape(shape) for key in ("fp32", "exp_avg", "exp_avg_sq")}
        if hasattr(param, "ds_id"):  # ZeRO-3
            for key, optim_key in (("fp32", None), ("exp_avg", "exp_avg"), ("exp_avg_sq", "exp_avg_sq")):
                _set_zero3_partition(param, values[key], optim_key)
        else:
            safe_set_full_fp32_param(param, values["fp32"])
            for key in ("exp_avg", "exp_avg_sq"):
                safe_set_full_optimizer_state(param, values[key], key)
        _set_model_copy(param, values["fp32"])
        step = step if step is not None else _universal_step(folder, name)
    _set_adam_step(engine.optimizer, step)
    states = _model_states_file(folder)
    saved = torch.load(states, map_location="cpu", weights_only=False)
    if engine.lr_scheduler is not None and saved.get("lr_scheduler") is not None:
        engine.lr_scheduler.load_state_dict(saved["lr_scheduler"])
    engine.global_steps = saved.get("global_steps", engine.global_steps)
    engine.global_samples = saved.get("global_samples", engine.global_samples)
    barrier()
    return saved


@torch.no_grad()
def _set_zero3_partition(param: torch.nn.Parameter, value: torch.Tensor, optim_key: str | None) -> None:
    """This rank's slice of a ZeRO-3 parameter's fp32 master weights (``optim_key`` None) or Adam moment.

    DeepSpeed's ``safe_set_full_*`` narrows the unpadded value at ``rank x partition``, which runs past its end on
    the last rank when the parameter does not split evenly; here the value is padded as ZeRO-3 pads it."""
    optimizer = param._z3_optimizer
    part, _ = optimizer._get_fp32_opt_state_partition(param, release_swap_buffers=False, optim_state_key=optim_key)
    flat = value.flatten()
    size = param.ds_tensor.numel()
    flat = torch.nn.functional.pad(flat, (0, size * dist.get_world_size() - flat.numel()))
    part.data.copy_(flat.narrow(0, size * dist.get_rank(), size)[: part.numel()].to(part.dtype))


def _universal_tensor(folder: str, name: str, key: str) -> torch.Tensor:
    path = os.path.join(folder, "zero", name, f"{key}.pt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"universal checkpoint {folder}: no {key} for parameter {name} ({path})")
    loaded = torch.load(path, map_location="cpu", weights_only=False)
    return (loaded["param"] if isinstance(loaded, dict) else loaded).float()  # ZeRO-1/2: a dict; ZeRO-3: the tensor


def _universal_step(folder: str, name: str):
    path = os.path.join(folder, "zero", name, "step.pt")
    return torch.load(path, map_location="cpu", weights_only=False) if os.path.exists(path) else None


def _model_states_file(folder: str) -> str:
    for name in (MODEL_STATES, "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if os.path.exists(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise FileNotFoundError(f"universal checkpoint {folder}: no model states file ({MODEL_STATES} or ZeRO-3's)")


@torch.no_grad()
def _set_model_copy(param: torch.nn.Parameter, value: torch.Tensor) -> None:
    """The parameter the forward reads: whole under ZeRO-1/2, this rank's slice of the flat tensor under ZeRO-3."""
    if hasattr(param, "ds_id"):
        part = param.ds_tensor
        start = part.numel() * dist.get_rank()
        piece = value.flatten()[start : start + part.numel()]
        part.data.zero_()
        part.data[: piece.numel()].copy_(piece.to(part.dtype))
    else:
        param.data.copy_(value.to(param.dtype))


def _init_adam_state(optimizer) -> None:
    """Adam's state for every fp32 partition this rank holds, as its first step creates it (zero moments): a fresh
    engine has none until then, and the loaded moments need a place."""
    inner = getattr(optimizer, "optimizer", optimizer)
    partitions = [t for group in inner.param_groups for t in group["params"]]
    partitions += list(getattr(optimizer, "fp32_partitioned_groups_flat", []))  # ZeRO-3's sub-group partitions
    step = torch.tensor(0.0) if isinstance(inner, torch.optim.AdamW) else 0  # DeepSpeedCPUAdam counts in ints
    for tensor in partitions:
        state = inner.state[tensor]
        state.setdefault("step", step)
        for key in ("exp_avg", "exp_avg_sq"):
            state.setdefault(key, torch.zeros_like(tensor, memory_format=torch.preserve_format))


def _set_adam_step(optimizer, step) -> None:
    """The Adam step count of every fp32 partition this rank holds (torch's AdamW keeps one per tensor)."""
    if step is None:
        return
    inner = getattr(optimizer, "optimizer", optimizer)
    for group in inner.param_groups:
        for tensor in group["params"]:
            if tensor in inner.state and "step" in inner.state[tensor]:
                old = inner.state[tensor]["step"]
                inner.state[tensor]["step"] = (
                    torch.as_tensor(step, dtype=old.dtype) if torch.is_tensor(old) else int(step)
                )


def check_world_size(path: str, saved: int) -> None:
    """A checkpoint saved by another number of ranks must come through the universal format: say so."""
    if saved != dist.get_world_size():
        raise ValueError(
            f"{path}: saved by {saved} ranks, this run has {dist.get_world_size()}; it loads only through its "
            "universal form (train/loop.py converts it when the world size changed)"
        )


def load_checkpoint(engine, folder: CheckpointFolder, universal_root: str | None = None) -> dict | None:
    """Load the newest checkpoint (model, optimizer, scheduler); return its client_state or None.

    ``universal_root``: the folder `to_universal` wrote, when this run's world size differs from the saver's
    (the engine was then initialised with `universal_settings`)."""
    tag = folder.latest_tag()
    if tag is None:
        return None
    if universal_root is not None:
        client_state = load_universal(engine, universal_root, tag)
        logger.info(
            "resumed from %s (universal: saved by %d ranks, now %d)",
            os.path.join(universal_root, tag),
            len(client_state["ranks"]),
            dist.get_world_size(),
        )
        return client_state
    # before DeepSpeed's loader, which fails deep inside on another world size
    saved = len(folder.optimizer_state_files(tag))
    if saved:
        check_world_size(folder.tag_dir(tag), saved)
    path, client_state = engine.load_checkpoint(folder.path, load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"{folder.path}: DeepSpeed could not load the checkpoint named in 'latest'")
    check_world_size(path, len(client_state.get("ranks", [])))
    logger.info("resumed from %s", path)
    return client_state
