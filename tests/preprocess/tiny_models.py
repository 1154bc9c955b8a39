"""Tiny randomly initialised models, built and saved locally (no download): a VisionEncoderDecoder captioner
(ViT encoder + GPT-2 decoder, a word-level tokenizer), a Whisper speech recogniser (byte-level BPE tokenizer from
hand-written vocab/merges files) and an open_clip CLIP for the frame-text scores."""

from __future__ import annotations

import json
from pathlib import Path

WORDS = (
    "a the of and in on with man woman dog cat car street room table people playing red blue green "
    "video pattern test color bars walking sitting standing small large bright dark screen picture"
).split()


def build_captioner(folder: Path, seed: int = 0) -> Path:
    """A ~100k-parameter ViT + GPT-2 VisionEncoderDecoder with a word-level tokenizer, saved to ``folder``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        PreTrainedTokenizerFast,
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
        ViTConfig,
        ViTImageProcessor,
        ViTModel,
    )

    specials = ["[PAD]", "[BOS]", "[EOS]", "[UNK]"]
    vocab = {tok: i for i, tok in enumerate(specials + list(WORDS))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]", unk_token="[UNK]"
    )
    torch.manual_seed(seed)
    encoder = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        initializer_range=0.5,
    )
    decoder = GPT2Config(
        vocab_size=len(vocab),
        n_positions=64,
        n_embd=32,
        n_layer=1,
        n_head=2,
        add_cross_attention=True,
        is_decoder=True,
        initializer_range=0.5,
        bos_token_id=vocab["[BOS]"],
        eos_token_id=vocab["[EOS]"],
        pad_token_id=vocab["[PAD]"],
    )
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id = vocab["[BOS]"]
    config.pad_token_id = vocab["[PAD]"]
    config.eos_token_id = vocab["[EOS]"]
    model = VisionEncoderDecoderModel(config=config, encoder=ViTModel(encoder), decoder=GPT2LMHeadModel(decoder))
    model.generation_config.decoder_start_token_id = vocab["[BOS]"]
    model.generation_config.pad_token_id = vocab["[PAD]"]
    model.generation_config.eos_token_id = vocab["[EOS]"]
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def _byte_chars() -> list[str]:
    """GPT-2's byte-to-unicode table: the 256 symbols a byte-level BPE vocabulary starts from."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    order = sorted(zip(printable, codes))
    return [chr(c) for _, c in order]


WHISPER_SPECIALS = [
    "<|endoftext|>",
    "<|startoftranscript|>",
    "<|en|>",
    "<|transcribe|>",
    "<|translate|>",
    "<|nocaptions|>",
    "<|notimestamps|>",
]


def build_whisper(folder: Path, seed: int = 0) -> Path:
    """A tiny Whisper (d_model 32, one layer each side, 80 mel bins) with a byte-level tokenizer."""
    import torch
    from transformers import (
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizer,
    )

    folder.mkdir(parents=True, exist_ok=True)
    chars = _byte_chars()
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġ", "a"), ("i", "n"), ("o", "n")]
    vocab = {c: i for i, c in enumerate(chars)}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    for tok in WHISPER_SPECIALS:
        vocab[tok] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    tokenizer = WhisperTokenizer(
        str(folder / "vocab.json"),
        str(folder / "merges.txt"),
        unk_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    ids = {tok: vocab[tok] for tok in WHISPER_SPECIALS}
    torch.manual_seed(seed)
    config = WhisperConfig(
        vocab_size=len(vocab),
        num_mel_bins=80,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_source_positions=1500,
        max_target_positions=64,
        pad_token_id=ids["<|endoftext|>"],
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|endoftext|>"],
        decoder_start_token_id=ids["<|startoftranscript|>"],
        init_std=0.5,
    )
    model = WhisperForConditionalGeneration(config)
    gen = model.generation_config
    gen.decoder_start_token_id = ids["<|startoftranscript|>"]
    gen.no_timestamps_token_id = ids["<|notimestamps|>"]
    gen.forced_decoder_ids = None
    gen.is_multilingual = False
    readable = (
        {vocab[c] for c in "abcdefghijklmnopqrstuvwxyzĠ"} | {vocab[a + b] for a, b in merges} | {ids["<|endoftext|>"]}
    )
    gen.suppress_tokens = sorted(set(range(len(vocab))) - readable)  # lower-case words only
    gen.begin_suppress_tokens = []
    gen.pad_token_id = gen.eos_token_id = ids["<|endoftext|>"]
    model.save_pretrained(folder)
    WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=80), tokenizer=tokenizer).save_pretrained(
        folder
    )
    return folder


TINY_CLIP = {
    "embed_dim": 16,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "head_width": 16, "layers": 1},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
"""A ~1.7M-parameter open_clip CLIP (most of it the token embedding of open_clip's own BPE vocabulary)."""


def build_open_clip(folder: Path, seed: int = 0) -> dict[str, Path]:
    """A tiny random open_clip CLIP saved both ways a score model may be given: ``file``, a safetensors file with its
    config beside it (``tiny-clip.json``, as train.export writes), and ``folder``, open_clip's own layout
    (``open_clip_config.json`` and ``open_clip_model.safetensors``, read through ``local-dir:``)."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = open_clip.CLIP(**TINY_CLIP)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tiny-clip.json").write_text(json.dumps(TINY_CLIP))
    save_file(state, str(folder / "tiny-clip.safetensors"))
    local = folder / "local"
    local.mkdir(exist_ok=True)
    (local / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP, "preprocess_cfg": {}}))
    save_file(state, str(local / "open_clip_model.safetensors"))
    return {"file": folder / "tiny-clip.safetensors", "folder": local}
