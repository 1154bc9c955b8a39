"""Caption stage: an image-captioning model (transformers, local path) over clips' middle frames, in batches.

Ray-agnostic: :class:`Captioner` loads the model once and captions a list of images; the Ray
job (:mod:`preprocess.job`) holds one per actor. Any model that ``AutoModelForImageTextToText``
loads works: BLIP, GIT, a VisionEncoderDecoder. Decoding is greedy or beam search (never
sampling) in eval mode, so a caption depends only on the image, the model and these settings.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from preprocess.text.model_loading import LOAD_ERRORS, check_model_kind, load_model, load_processor


@dataclass(frozen=True, kw_only=True)
class CaptionConfig:
    """Which captioning model and how it generates."""

    model: str
    """Local folder of a transformers image-to-text model (config, weights, processor, tokenizer)."""
    batch_size: int = 16
    """Middle frames per model call."""
    num_beams: int = 1
    """1: greedy decoding; more: beam search."""
    max_new_tokens: int = 30
    """Longest caption, in tokens."""
    prompt: str = ""
    """Text the caption continues (conditional captioning, e.g. ``a picture of``); stripped from the output."""

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError("model must be a non-empty local path")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


def check_captioner(cfg: CaptionConfig) -> None:
    """Fail fast, before any work: the folder must hold an image-to-text model and its processing."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

    kind = "an image captioner (expected an image-to-text model such as BLIP, GIT or a VisionEncoderDecoder)"
    check_model_kind(cfg.model, "caption", MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING, kind)
    _processing(cfg.model)


def _processing(path: str):
    """(processor or None, image processor, tokenizer) of a captioning model folder."""
    from transformers import AutoImageProcessor, AutoTokenizer

    try:
        processor = load_processor(path, "caption", "image_processor", "tokenizer")
    except ValueError:  # no processor holding both: load the two parts on their own
        processor = None
    if processor is not None:
        return processor, processor.image_processor, processor.tokenizer
    try:
        return None, AutoImageProcessor.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    except LOAD_ERRORS as exc:
        raise ValueError(f"caption model {path}: no usable image processor and tokenizer ({exc})") from exc


class Captioner:
    """One loaded captioning model: ``captioner(images) -> captions``, one per image, in order."""

    def __init__(self, cfg: CaptionConfig, device: str = "cpu"):
        import torch
        from transformers import AutoModelForImageTextToText

        check_captioner(cfg)
        self.cfg, self.device = cfg, device
        self.model = load_model(AutoModelForImageTextToText, cfg.model, device, "caption")
        self.processor, self.image_processor, self.tokenizer = _processing(cfg.model)
        self._torch = torch

    def __call__(self, images: list) -> list[str]:
        """Captions of PIL images (greedy/beam decoding, no sampling)."""
        if not images:
            return []
        images = [im.convert("RGB") for im in images]
        inputs = self._inputs(images)
        with self._torch.inference_mode():
            out = self.model.generate(
                **inputs, max_new_tokens=self.cfg.max_new_tokens, num_beams=self.cfg.num_beams, do_sample=False
            )
        texts = self.tokenizer.batch_decode(out, skip_special_tokens=True)
        return [self._clean(t) for t in texts]

    def from_jpegs(self, jpegs: list[bytes]) -> list[str]:
        """Captions of JPEG-encoded frames (as stored in the shards)."""
        from PIL import Image

        return self([Image.open(io.BytesIO(data)) for data in jpegs])

    def _inputs(self, images: list) -> dict:
        n, prompt = len(images), self.cfg.prompt
        if self.processor is not None:
            enc = self.processor(images=images, text=[prompt] * n if prompt else None, return_tensors="pt")
            return {k: v.to(self.device) for k, v in enc.items()}
        pixels = self.image_processor(images=images, return_tensors="pt").pixel_values.to(self.device)
        inputs = {"pixel_values": pixels}
        if prompt:
            start = self.model.config.decoder_start_token_id
            ids = [start] + self.tokenizer(prompt, add_special_tokens=False).input_ids
            inputs["decoder_input_ids"] = self._torch.tensor([ids] * n, device=self.device)
        return inputs

    def _clean(self, text: str) -> str:
        text = text.strip()
        prompt = self.cfg.prompt.strip()
        if prompt and text.lower().startswith(prompt.lower()):
            text = text[len(prompt) :].strip()
        return text
