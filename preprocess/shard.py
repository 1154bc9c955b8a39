"""Command line: HD-VILA-style metadata and videos -> WebDataset shards, on Ray.

    python preprocess/shard.py --metadata meta.jsonl --videos videos/ --output out/
    ray job submit --working-dir . -- python preprocess/shard.py ...
    ray submit launch/ray-local.yaml preprocess/shard.py -- ...

Exit codes: 0 all shards committed and the manifest written; 1 some shards could not be
committed (rerun the same command to finish them); 2 bad arguments or inputs.
See docs/preprocessing.md.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys


def _ensure_importable() -> None:
    """Make ``python preprocess/shard.py`` work from any folder: put the repo root on sys.path."""
    here = os.path.dirname(os.path.abspath(__file__))
    if sys.path and os.path.abspath(sys.path[0] or ".") == here:
        sys.path.pop(0)  # the script's own folder would shadow modules with its file names
    if importlib.util.find_spec("preprocess") is None or importlib.util.find_spec("pipeline") is None:
        sys.path.insert(0, os.environ.get("VIDPROXY_ROOT") or os.path.dirname(here))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="preprocess/shard.py", description="HD-VILA metadata + videos -> WebDataset shards (Ray).")
    io_ = p.add_argument_group("inputs and output")
    io_.add_argument("--metadata", required=True, help="HD-VILA metadata jsonl (path or s3://)")
    io_.add_argument("--videos", required=True, help="folder or s3:// prefix of the videos")
    io_.add_argument("--layout", choices=("source", "clips"), default="source", help="source: <video_id>.<ext> cut by span; clips: pre-cut <video_id>/<clip_id>")
    io_.add_argument("--subtitles", help="jsonl of {clip_id, text}, or an LMDB folder of clip_id -> text")
    io_.add_argument("--captions", help="jsonl of {clip_id, caption}, a JSON list of {image_id, caption}, or an LMDB folder")
    io_.add_argument("--max-text-chars", type=int, default=2000, help="truncate longer subtitles/captions (counted in the stats)")
    io_.add_argument("--output", required=True, help="output folder or s3:// prefix")
    io_.add_argument("--clips-per-shard", type=int, default=1000, help="metadata clips per shard (shard ids follow input position)")
    io_.add_argument("--max-shard-bytes", type=int, default=1 << 30, help="split a shard's tar beyond this size")
    dec = p.add_argument_group("decoding")
    dec.add_argument("--num-frames", type=int, default=12, help="uniformly spaced frames per clip (when --fps is not set)")
    dec.add_argument("--fps", type=float, default=None, help="sample at this rate instead, capped at --max-frames")
    dec.add_argument("--max-frames", type=int, default=32, help="cap on frames per clip with --fps")
    add_geometry_args(dec)
    dec.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality 1-100")
    dec.add_argument("--decoder-threads", type=int, default=1, help="decoder threads per task")
    gen = p.add_argument_group("generated texts (model stages)")
    gen.add_argument("--caption-model", help="local folder of a transformers image captioner: caption the middle frame of clips without a given caption")
    gen.add_argument("--caption-batch-size", type=int, default=16, help="middle frames per captioner call")
    gen.add_argument("--caption-beams", type=int, default=1, help="beam size (1: greedy)")
    gen.add_argument("--caption-max-tokens", type=int, default=30, help="longest caption in tokens")
    gen.add_argument("--caption-prompt", default="", help="text the caption continues (conditional captioners)")
    gen.add_argument("--asr-model", help="local folder of a Whisper-family model: transcribe clips without a given subtitle")
    gen.add_argument("--asr-batch-size", type=int, default=8, help="clips per ASR call")
    gen.add_argument("--asr-beams", type=int, default=1, help="beam size (1: greedy)")
    gen.add_argument("--asr-max-tokens", type=int, default=128, help="longest transcript in tokens")
    gen.add_argument("--asr-language", default=None, help="spoken language for multilingual models (default: detect)")
    gen.add_argument("--model-actors", type=int, default=None, help="actors per model stage (default: one per GPU, or 1)")
    gen.add_argument("--model-cpus", type=float, default=1.0, help="CPUs reserved per model actor")
    run = p.add_argument_group("ray and run control")
    run.add_argument("--ray-address", default=None, help="cluster address; default RAY_ADDRESS or a running cluster, else a new local one; 'local' for a new local one")
    run.add_argument("--num-cpus", type=int, default=None, help="CPUs of a new local cluster")
    run.add_argument("--max-in-flight", type=int, default=None, help="shard tasks in flight at once (default 2x cluster CPUs)")
    run.add_argument("--max-retries", type=int, default=3, help="reruns of a shard task after a worker death or an error")
    run.add_argument("--video-timeout", type=float, default=600.0, help="seconds one video may take before its task is killed")
    run.add_argument("--retry-failed", action="store_true", help="redo the committed shards that recorded failed clips")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return p


def add_geometry_args(group) -> None:
    """--frame-size / --short-side (one of them; neither: 224x224)."""
    group.add_argument("--frame-size", type=frame_size_arg, default=None, metavar="WxH",
                       help="store frames at exactly WxH, aspect not kept; default 224x224, the training size "
                            "(the paper squashes every frame to it), so the training loader only decodes")
    group.add_argument("--short-side", type=int, default=None, metavar="N",
                       help="keep the aspect ratio instead: resize so the short side is N pixels (0: as decoded)")


def frame_size_arg(text: str) -> tuple[int, int]:
    """argparse type for WxH, e.g. 224x224."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 224x224, got {text!r}") from None
    return width, height


def build_config(args: argparse.Namespace):
    """Arguments -> PreprocessConfig (ValueError on a bad value, naming the field)."""
    from preprocess.asr import AsrConfig
    from preprocess.captions import CaptionConfig
    from preprocess.config import InputConfig, PreprocessConfig, RayConfig, ShardingConfig
    from preprocess.decode import DecodeConfig

    captioner = asr = None
    if args.caption_model:
        captioner = CaptionConfig(model=args.caption_model, batch_size=args.caption_batch_size, num_beams=args.caption_beams,
                                  max_new_tokens=args.caption_max_tokens, prompt=args.caption_prompt)
    if args.asr_model:
        asr = AsrConfig(model=args.asr_model, batch_size=args.asr_batch_size, num_beams=args.asr_beams,
                        max_new_tokens=args.asr_max_tokens, language=args.asr_language)

    return PreprocessConfig(
        inputs=InputConfig(
            metadata=args.metadata,
            videos=args.videos,
            layout=args.layout,
            subtitles=args.subtitles,
            captions=args.captions,
            max_text_chars=args.max_text_chars,
        ),
        sharding=ShardingConfig(output=args.output, clips_per_shard=args.clips_per_shard, max_shard_bytes=args.max_shard_bytes),
        decode=DecodeConfig(
            num_frames=args.num_frames,
            fps=args.fps,
            max_frames=args.max_frames,
            short_side=args.short_side,
            frame_size=args.frame_size,
            jpeg_quality=args.jpeg_quality,
            threads=args.decoder_threads,
        ),
        ray=RayConfig(
            address=args.ray_address,
            num_cpus=args.num_cpus,
            max_in_flight=args.max_in_flight,
            max_retries=args.max_retries,
            video_timeout_s=args.video_timeout,
            model_actors=args.model_actors,
            model_cpus=args.model_cpus,
        ),
        captioner=captioner,
        asr=asr,
        retry_failed=args.retry_failed,
        progress=not args.no_progress,
    )


def setup_logging(level: str) -> None:
    """One handler on the project's loggers (the root logger is left alone)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("preprocess", "pipeline"):
        logger = logging.getLogger(name)
        logger.setLevel(level)
        for old in [h for h in logger.handlers if getattr(h, "_vidproxy", False)]:
            logger.removeHandler(old)
        handler._vidproxy = True
        logger.addHandler(handler)
        logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    _ensure_importable()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = build_config(args)
    except ValueError as exc:
        parser.error(str(exc))
    setup_logging(args.log_level)
    from preprocess.job import run_job

    try:
        result = run_job(cfg)
    except ValueError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    print(result.summary())
    return 0 if result.manifest else 1


if __name__ == "__main__":
    sys.exit(main())
