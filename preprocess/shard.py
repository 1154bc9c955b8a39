"""Command line: HD-VILA-style metadata and videos -> WebDataset shards, on Ray.

    python preprocess/shard.py --metadata meta.jsonl --videos videos/ --output out/
    python preprocess/shard.py --metadata 'hdvila_part*.jsonl' --fetch --output s3://b/shards
    ray job submit --working-dir . -- python preprocess/shard.py ...
    ray submit launch/ray-local.yaml preprocess/shard.py -- ...

Exit codes: 0 all shards committed and the manifest written; 1 some shards could not be
committed (rerun the same command to finish them); 2 bad arguments or inputs (a required text without a
source, too many source videos missing: ``--require-texts``, ``--max-missing-videos``), or storage that is
unreachable or refuses the credentials (one line on stderr naming the URI).
See docs/preprocessing.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import sys


def _ensure_importable() -> None:
    """Make ``python preprocess/shard.py`` work from any folder: put the repo root on sys.path."""
    here = os.path.dirname(os.path.abspath(__file__))
    if sys.path and os.path.abspath(sys.path[0] or ".") == here:
        sys.path.pop(0)  # the script's own folder would shadow modules with its file names
    if importlib.util.find_spec("preprocess") is None or importlib.util.find_spec("pipeline") is None:
        sys.path.insert(0, os.environ.get("VIDPROXY_ROOT") or os.path.dirname(here))


# Flags are generated from the config dataclasses (pipeline/config.py): their defaults and field docstrings are
# the help. A section's flags carry its prefix; a few keep the names users know.
SECTIONS = (  # (config field, flag prefix, flag names that differ from prefix + field)
    ("inputs", "", {}),
    ("sharding", "", {}),
    ("decode", "", {"threads": "decoder-threads"}),
    ("ray", "", {"address": "ray-address", "video_timeout_s": "video-timeout", "stall_timeout_s": "stall-timeout"}),
    ("captioner", "caption-", {"num_beams": "caption-beams", "max_new_tokens": "caption-max-tokens"}),
    ("asr", "asr-", {"num_beams": "asr-beams", "max_new_tokens": "asr-max-tokens"}),
    ("scores", "score-", {}),
    (
        "fetch",
        "fetch-",
        {
            "max_video_bytes": "max-video-bytes",
            "max_video_seconds": "max-video-seconds",
            **{f"{name}_s": f"fetch-{name.replace('_', '-')}" for name in ("timeout", "read_timeout", "backoff")},
            "max_backoff_s": "fetch-max-backoff",
        },
    ),
)
NOT_FLAGS = {"fetch": ("audio", "stored_short_side"), "decode": ("thumbnails",)}
"""Fields the job sets itself (the fetch of audio follows the ASR stage, the format choice the stored frame size,
the thumbnails the quality scores)."""
OPTIONAL_SECTIONS = {"captioner": "caption-model", "asr": "asr-model"}


def build_parser() -> argparse.ArgumentParser:
    from pipeline import config
    from pipeline.logs import LEVELS
    from preprocess.config import PreprocessConfig

    p = argparse.ArgumentParser(
        prog=config.prog("preprocess/shard.py"),
        description=__doc__.split("\n\n")[0],
        formatter_class=config.HelpFormatter,
    )
    types = config.hints(PreprocessConfig)
    for name, prefix, names in SECTIONS:
        optional = name in OPTIONAL_SECTIONS
        section = config.section_type(types[name])
        hidden = NOT_FLAGS.get(name, ())
        config.add_flags(
            p,
            section,
            dest=name,
            prefix=prefix,
            names=names,
            only=tuple(f.name for f in dataclasses.fields(section) if f.name not in hidden) if hidden else None,
            optional=optional,
            title=config.field_docs(PreprocessConfig)[name],
        )
    config.add_flags(p, PreprocessConfig, dest="job", title="run control")
    p.add_argument(
        "--log-level", default="INFO", choices=LEVELS, help="log level of the job's messages (default: INFO)"
    )
    return p


def build_config(args: argparse.Namespace):
    """Arguments -> PreprocessConfig (ValueError on a bad value, naming the field)."""
    from pipeline import config
    from preprocess.config import PreprocessConfig

    values = config.flag_values(args, "job")
    for name, _, _ in SECTIONS:
        section = config.flag_values(args, name)
        if name in OPTIONAL_SECTIONS and section and "model" not in section:
            raise ValueError(f"--{OPTIONAL_SECTIONS[name][: -len('model')]}* flags need --{OPTIONAL_SECTIONS[name]}")
        if section:
            values[name] = section
    return config.build(PreprocessConfig, values)


def main(argv: list[str] | None = None) -> int:
    _ensure_importable()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = build_config(args)
    except ValueError as exc:
        parser.error(str(exc))
    from pipeline.logs import setup_logging
    from pipeline.storage import StorageError
    from preprocess.job import run_job

    setup_logging(args.log_level)

    try:
        if cfg.plan_only:
            return _print_plan(cfg, parser.prog)
        result = run_job(cfg)
    except ValueError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    except StorageError as exc:  # storage unreachable, refused or missing: one line naming the URI, no traceback
        print(f"{parser.prog}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print(result.summary())
    return 0 if result.manifest else 1


def _print_plan(cfg, prog: str) -> int:
    """The plan on stdout; exit 2 with one line on stderr per reason the job would not start."""
    from preprocess.plan_report import plan_report, score_lines, score_refusal

    report = plan_report(cfg)
    print("\n".join(report.lines(cfg) + score_lines(cfg)), flush=True)
    refusals = report.refusals + [r for r in [score_refusal(cfg)] if r]
    for reason in refusals:
        print(f"{prog}: error: {reason}", file=sys.stderr)
    return 2 if refusals else 0


if __name__ == "__main__":
    sys.exit(main())
