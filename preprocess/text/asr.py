"""ASR stage: a Whisper-family speech recogniser (transformers, local path) over clips' audio, in batches.

Ray-agnostic: :class:`Transcriber` loads the model once and transcribes a list of 16 kHz mono
float32 arrays (what :func:`preprocess.decode.decode_clips` gives for clips that ask for
audio). Any model that ``AutoModelForSpeechSeq2Seq`` loads with a processor that has a feature
extractor and a tokenizer works. Whisper reads 30 s windows: a longer clip is transcribed from
its first 30 s only.
"""

from __future__ import annotations

from dataclasses import dataclass

from preprocess.decode import AUDIO_RATE
from preprocess.text.model_loading import check_model_kind, load_model, load_processor


@dataclass(frozen=True, kw_only=True)
class AsrConfig:
    """Which speech model and how it generates."""

    model: str
    """Local folder of a transformers speech-to-text model (Whisper family) with its processor."""
    batch_size: int = 8
    """Clips per model call."""
    num_beams: int = 1
    """1: greedy decoding; more: beam search."""
    max_new_tokens: int = 128
    """Longest transcript, in tokens."""
    language: str | None = None
    """Spoken language for multilingual Whisper models (e.g. ``en``); None lets the model detect it."""

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError("model must be a non-empty local path")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.language is not None and not (isinstance(self.language, str) and self.language):
            raise ValueError(f"language must be None or a language code, got {self.language!r}")


def check_transcriber(cfg: AsrConfig) -> None:
    """Fail fast, before any work: the folder must hold a speech-to-text model and its processor."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING

    kind = "a speech recogniser (expected a speech-to-text model such as Whisper)"
    check_model_kind(cfg.model, "ASR", MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING, kind)
    _processor(cfg.model)


def _processor(path: str):
    """The model's processor: a feature extractor (audio -> features) and a tokenizer (ids -> text)."""
    return load_processor(path, "ASR", "feature_extractor", "tokenizer")


class Transcriber:
    """One loaded speech model: ``transcriber(audios) -> texts``, one per clip, in order."""

    def __init__(self, cfg: AsrConfig, device: str = "cpu"):
        import torch
        from transformers import AutoModelForSpeechSeq2Seq

        check_transcriber(cfg)
        self.cfg, self.device = cfg, device
        self.model = load_model(AutoModelForSpeechSeq2Seq, cfg.model, device, "ASR")
        self.processor = _processor(cfg.model)
        self._torch = torch

    def __call__(self, audios: list) -> list[str]:
        """Transcripts of 16 kHz mono float32 arrays."""
        if not audios:
            return []
        features = self.processor.feature_extractor(list(audios), sampling_rate=AUDIO_RATE, return_tensors="pt")
        kwargs = {"max_new_tokens": self.cfg.max_new_tokens, "num_beams": self.cfg.num_beams, "do_sample": False}
        if self.cfg.language:
            kwargs.update(language=self.cfg.language, task="transcribe")
        with self._torch.inference_mode():
            out = self.model.generate(features.input_features.to(self.device), **kwargs)
        return [t.strip() for t in self.processor.tokenizer.batch_decode(out, skip_special_tokens=True)]
