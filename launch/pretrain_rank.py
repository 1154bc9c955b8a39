"""One training rank as a launcher starts it: what ``launch/pretrain.sh`` runs in every rank.

The DeepSpeed launcher runs ``python -u launch/pretrain.sh --local_rank=N TRAIN_ARGS`` (or, with
``--no_python``, the script itself); both end here (docs/training.md, "Run it"). This module

* takes the launchers' conventions off the command line: ``--local_rank`` (the launcher also sets
  LOCAL_RANK, which train/engine.py reads), DeepSpeed's ``--deepspeed`` switch, and
  ``--deepspeed_config FILE`` (or Hugging Face's ``--deepspeed FILE``), which becomes the
  ``zero.extra=FILE`` setting (train/config.py);
* gives the rank the environment launch/pretrain.sh gives its own ranks, where the caller has not
  set it: the repository on PYTHONPATH, TORCH_EXTENSIONS_DIR under ``.cache/``, no Hub downloads,
  and on a machine without a GPU DeepSpeed's CPU accelerator with one thread per rank;
* runs ``train.main``.
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WRAPPER_OPTIONS = {
    "--gpus": "--num_gpus",
    "--nodes": "--num_nodes",
    "--node-rank": "--no_ssh --node_rank",
    "--master-addr": "--master_addr",
    "--master-port": "--master_port",
}
"""launch/pretrain.sh's own options and what to give the deepspeed launcher instead."""
FRAGMENT_SUFFIXES = (".json", ".yaml", ".yml")


def rank_args(argv: list[str]) -> list[str]:
    """train.main's arguments from a rank's command line (ValueError on a misplaced option)."""
    out: list[str] = []
    extra = None
    args = list(argv)
    while args:
        arg = args.pop(0)
        name, has_value, value = arg.partition("=")
        if name in ("--local_rank", "--local-rank"):
            if not has_value and args:
                args.pop(0)
        elif arg == "--deepspeed":  # DeepSpeed's switch (deepspeed.add_config_arguments), or HF's --deepspeed FILE
            if args and args[0].endswith(FRAGMENT_SUFFIXES) and "=" not in args[0]:
                extra = args.pop(0)
        elif name == "--deepspeed_config":
            if not has_value:
                if not args:
                    raise ValueError("--deepspeed_config needs a file")
                value = args.pop(0)
            extra = value
        elif arg == "--" and not out:
            continue  # `deepspeed launch/pretrain.sh -- ARGS`, written as for the stand-alone script
        elif name in WRAPPER_OPTIONS:
            raise ValueError(
                f"{name} is an option of the stand-alone launch/pretrain.sh; under the deepspeed launcher "
                f"give deepspeed {WRAPPER_OPTIONS[name]} before the script"
            )
        else:
            out.append(arg)
    if extra is not None:
        if any(a.startswith(("zero.extra=", "zero.extra.")) for a in out):
            raise ValueError("give the DeepSpeed fragment once: --deepspeed_config FILE or zero.extra=FILE")
        out.append(f"zero.extra={extra}")
    return out


def rank_environment() -> None:
    """Defaults for what launch/pretrain.sh sets for its ranks (values already set are kept)."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if ROOT not in paths:  # for DataLoader workers started by spawn
        os.environ["PYTHONPATH"] = os.pathsep.join([ROOT, *filter(None, paths)])
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".cache", "torch_extensions"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    accelerator = os.environ.get("DS_ACCELERATOR")
    if accelerator not in (None, "cpu"):
        return
    import torch

    if accelerator == "cpu" or not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
        if "OMP_NUM_THREADS" not in os.environ:  # ranks share the cores (launch/pretrain.sh does the same)
            os.environ["OMP_NUM_THREADS"] = "1"
            torch.set_num_threads(1)


def main(argv: list[str] | None = None) -> int:
    try:
        args = rank_args(sys.argv[1:] if argv is None else argv)
    except ValueError as exc:
        print(f"launch/pretrain.sh: {exc}", file=sys.stderr)
        return 2
    rank_environment()
    from train.main import main as train_main

    return train_main(args)


if __name__ == "__main__":
    sys.exit(main())
