"""CLIP-ViP checkpoint import/export against a tiny random transformers.CLIPModel (no download)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

from train.model import VideoCLIPConfig, build_model, tiny_clip_overrides
from train.weights import (
    CheckpointKeyError,
    clipvip_to_ours,
    load_clipvip_checkpoint,
    ours_to_clipvip,
    save_clipvip_checkpoint,
)

VOCAB, EOT, WIDTH, SLOTS = 1000, 999, 64, 12


def tiny_hf_clip(seed: int = 0) -> CLIPModel:
    """HF CLIP with the same shapes as tiny_clip_overrides(), every tensor perturbed (non-trivial LN/bias)."""
    torch.manual_seed(seed)
    common = dict(
        hidden_size=WIDTH,
        intermediate_size=4 * WIDTH,
        num_hidden_layers=2,
        num_attention_heads=4,
        hidden_act="quick_gelu",
        projection_dim=32,
    )
    text = CLIPTextConfig(vocab_size=VOCAB, max_position_embeddings=77, eos_token_id=EOT, **common)
    vision = CLIPVisionConfig(image_size=32, patch_size=8, **common)
    model = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=32))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model.eval()


def clipvip_state(hf: CLIPModel, num_proxies: int, seed: int = 1, zero_temporal: bool = True) -> dict:
    gen = torch.Generator().manual_seed(seed)
    state = {f"clipmodel.{k}": v.clone() for k, v in hf.state_dict().items()}
    state["clipmodel.vision_model.embeddings.added_cls"] = torch.randn(num_proxies - 1, WIDTH, generator=gen)
    temporal = torch.zeros(1, SLOTS, WIDTH) if zero_temporal else torch.randn(1, SLOTS, WIDTH, generator=gen)
    state["clipmodel.vision_model.embeddings.temporal_embedding"] = temporal
    return state


def our_model(num_proxies: int):
    return build_model(
        VideoCLIPConfig(
            clip_model="ViT-B-32", num_proxies=num_proxies, clip_overrides=tiny_clip_overrides(vocab_size=VOCAB)
        )
    )


def text_tokens(batch: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(2)
    tokens = torch.zeros(batch, 77, dtype=torch.long)
    for row, length in enumerate(torch.randint(3, 20, (batch,), generator=gen).tolist()):
        tokens[row, :length] = torch.randint(1, EOT - 1, (length,), generator=gen)
        tokens[row, length] = EOT
    return tokens


def pooled(output) -> torch.Tensor:
    return output.pooler_output if hasattr(output, "pooler_output") else output


def test_import_matches_hf_text_and_image_features(tmp_path):
    hf = tiny_hf_clip()
    path = tmp_path / "clipvip.bin"
    state = clipvip_state(hf, num_proxies=1)
    state["clipmodel.text_model.embeddings.position_ids"] = torch.arange(77)[None]  # older checkpoints
    torch.save(state, path)
    model = our_model(num_proxies=1)
    load_clipvip_checkpoint(model, path)
    model.eval()

    tokens = text_tokens()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        text_ref = F.normalize(pooled(hf.get_text_features(input_ids=tokens)), dim=-1)
        image_ref = F.normalize(pooled(hf.get_image_features(pixel_values=images)), dim=-1)
        assert (model.encode_text(tokens) - text_ref).abs().max().item() <= 1e-5
        assert (model.encode_image(images) - image_ref).abs().max().item() <= 1e-5
    assert model.logit_scale.item() == pytest.approx(hf.logit_scale.item())


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_export_import_round_trip(tmp_path, suffix):
    state = clipvip_state(tiny_hf_clip(), num_proxies=4, zero_temporal=False)
    model = our_model(num_proxies=4)
    model.load_state_dict(clipvip_to_ours(state, model.state_dict()))
    torch.testing.assert_close(model.proxy_tokens, state["clipmodel.vision_model.embeddings.added_cls"])
    torch.testing.assert_close(
        model.temporal_embedding, state["clipmodel.vision_model.embeddings.temporal_embedding"][0]
    )

    exported = ours_to_clipvip(model.state_dict())
    assert set(exported) == set(state)
    for key, tensor in state.items():
        torch.testing.assert_close(exported[key], tensor, rtol=0, atol=0, msg=key)

    path = tmp_path / f"roundtrip{suffix}"
    save_clipvip_checkpoint(model, path)
    fresh = our_model(num_proxies=4)
    load_clipvip_checkpoint(fresh, path)
    for key, tensor in model.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[key], tensor, rtol=0, atol=0, msg=key)


def test_single_proxy_round_trip_keeps_an_empty_added_cls():
    model = our_model(num_proxies=1)
    exported = ours_to_clipvip(model.state_dict())
    assert exported["clipmodel.vision_model.embeddings.added_cls"].shape == (0, WIDTH)
    clipvip_to_ours(exported, our_model(num_proxies=1).state_dict())


def test_missing_unexpected_and_mismatched_keys_are_all_listed():
    state = clipvip_state(tiny_hf_clip(), num_proxies=4)
    del state["clipmodel.vision_model.post_layernorm.bias"]
    state["clipmodel.some_head.weight"] = torch.zeros(3)
    state["clipmodel.visual_projection.weight"] = torch.zeros(16, WIDTH)
    with pytest.raises(CheckpointKeyError) as info:
        clipvip_to_ours(state, our_model(num_proxies=4).state_dict())
    error = info.value
    assert error.missing == ["clipmodel.vision_model.post_layernorm.bias"]
    assert error.unexpected == ["clipmodel.some_head.weight"]
    assert len(error.mismatched) == 1 and "clip.visual.proj" in error.mismatched[0]
    for text in ("post_layernorm.bias", "some_head", "visual_projection"):
        assert text in str(error)


def test_proxy_count_mismatch_is_reported():
    state = clipvip_state(tiny_hf_clip(), num_proxies=4)
    with pytest.raises(CheckpointKeyError, match="num_proxies=1"):
        clipvip_to_ours(state, our_model(num_proxies=1).state_dict())
    with pytest.raises(CheckpointKeyError, match="proxy_tokens"):
        clipvip_to_ours(state, our_model(num_proxies=2).state_dict())
