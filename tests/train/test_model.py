"""VideoCLIP invariants, each against an independent implementation (open_clip, dense mask, np.interp)."""

from __future__ import annotations

import math
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from train.model import (
    ATTENTION_FNS,
    VideoCLIPConfig,
    build_model,
    dense_proxy_attention,
    fused_proxy_attention,
    load_clip_weights,
    proxy_attention_mask,
    temporal_table,
    tiny_clip_overrides,
)


def tiny_config(**fields) -> VideoCLIPConfig:
    overrides = fields.pop("clip_overrides", tiny_clip_overrides())
    return VideoCLIPConfig(clip_model="ViT-B-32", clip_overrides=overrides, **fields)


def tiny_model(seed: int = 0, **fields):
    torch.manual_seed(seed)
    return build_model(tiny_config(**fields))


def frames(batch: int, num_frames: int, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, num_frames, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "field, value",
    [
        ("clip_model", "ViT-Nope-1"),
        ("num_proxies", 0),
        ("temporal_slots", 0),
        ("attention", "flash"),
        ("pretrained", ""),
        ("clip_overrides", {"vision": {}}),
        ("logit_scale_init", 6.0),
    ],
)
def test_config_rejects_bad_values_naming_the_field(field, value):
    fields = {"clip_model": "ViT-B-32", field: value}
    with pytest.raises(ValueError, match=field):
        VideoCLIPConfig(**fields)


def test_config_fields_are_keyword_only():
    with pytest.raises(TypeError):
        VideoCLIPConfig("ViT-B-32")  # type: ignore[misc]


# ----------------------------------------------------------------------------- parity with open_clip


@pytest.mark.parametrize(
    "overrides",
    [
        tiny_clip_overrides(),
        {"text_cfg": {"width": 64, "heads": 4, "layers": 1, "vocab_size": 1000}},  # real ViT-B/32 vision tower
    ],
    ids=["tiny", "vit-b-32"],
)
def test_one_proxy_one_frame_equals_open_clip_image_tower(overrides):
    model = tiny_model(num_proxies=1, clip_overrides=overrides).eval()
    size = model.clip.visual.image_size[0]
    images = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(3))
    assert torch.count_nonzero(model.temporal_embedding) == 0
    with torch.no_grad():
        ours = model.encode_image(images)
        reference = model.clip.encode_image(images, normalize=True)
    assert ours.shape == (1, model.clip.visual.output_dim)
    assert (ours - reference).abs().max().item() <= 1e-5


def test_text_tower_is_open_clip_normalised():
    model = tiny_model().eval()
    tokens = torch.randint(1, 999, (3, 77), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours = model.encode_text(tokens)
        reference = model.clip.encode_text(tokens, normalize=True)
    torch.testing.assert_close(ours, reference, rtol=0, atol=0)
    torch.testing.assert_close(ours.norm(dim=-1), torch.ones(3))


def test_image_is_a_one_frame_video():
    model = tiny_model(num_proxies=3).eval()
    with torch.no_grad():
        model.temporal_embedding.normal_()
    clip = frames(2, 1)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(clip[:, 0]), model.encode_video(clip), rtol=0, atol=0)


# ----------------------------------------------------------------------------- fused == dense


def test_mask_matches_hand_written_pattern():
    # M=2 proxies, T=2 frames, L=2 patches: tokens [p0 p1 | a0 a1 | b0 b1]
    expected = torch.tensor(
        [
            [1, 1, 1, 1, 1, 1],
            [1, 1, 1, 1, 1, 1],
            [1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [1, 1, 0, 0, 1, 1],
            [1, 1, 0, 0, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(proxy_attention_mask(2, 2, 2), expected)


def loop_reference_attention(q, k, v, num_proxies, num_frames):
    """Independent reference: per-query softmax over its allowed keys, one query at a time."""
    B, N, H, K = q.shape
    L = (N - num_proxies) // num_frames
    out = torch.zeros(B, N, H, K, dtype=torch.float64)
    for i in range(N):
        if i < num_proxies:
            keys = list(range(N))
        else:
            frame = (i - num_proxies) // L
            keys = list(range(num_proxies)) + list(range(num_proxies + frame * L, num_proxies + (frame + 1) * L))
        scores = torch.einsum("bhk,bjhk->bhj", q[:, i].double(), k[:, keys].double()) / math.sqrt(K)
        out[:, i] = torch.einsum("bhj,bjhk->bhk", scores.softmax(-1), v[:, keys].double())
    return out.reshape(B, N, H * K)


@pytest.mark.parametrize(
    "batch, num_proxies, num_frames, patches, heads, head_dim",
    [
        (1, 1, 1, 4, 1, 8),
        (2, 4, 3, 5, 2, 16),
        (3, 2, 5, 9, 4, 8),
    ],
)
def test_attention_functions_match_loop_reference(batch, num_proxies, num_frames, patches, heads, head_dim):
    gen = torch.Generator().manual_seed(5)
    N = num_proxies + num_frames * patches
    q, k, v = (torch.randn(batch, N, heads, head_dim, generator=gen) for _ in range(3))
    reference = loop_reference_attention(q, k, v, num_proxies, num_frames).float()
    for attend in (fused_proxy_attention, dense_proxy_attention):
        torch.testing.assert_close(attend(q, k, v, num_proxies, num_frames), reference, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "batch, num_proxies, num_frames, width, head_width",
    [
        (1, 1, 1, 32, 16),
        (2, 4, 3, 64, 16),
        (3, 3, 5, 48, 8),
        (2, 2, 12, 32, 32),
    ],
)
def test_fused_equals_dense_outputs_and_gradients(batch, num_proxies, num_frames, width, head_width):
    overrides = tiny_clip_overrides()
    overrides["vision_cfg"].update(width=width, head_width=head_width)
    fused = tiny_model(num_proxies=num_proxies, attention="fused", clip_overrides=overrides)
    dense = tiny_model(num_proxies=num_proxies, attention="dense", clip_overrides=overrides)
    dense.load_state_dict(fused.state_dict())
    with torch.no_grad():
        fused.temporal_embedding.normal_(std=0.1)
        dense.temporal_embedding.copy_(fused.temporal_embedding)
    outputs, input_grads = [], []
    for model in (fused, dense):
        clip = frames(batch, num_frames).requires_grad_()
        features = model.encode_video(clip)
        (features * torch.linspace(-1, 1, features.shape[-1])).sum().backward()
        outputs.append(features.detach())
        input_grads.append(clip.grad)
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(input_grads[0], input_grads[1], atol=1e-5, rtol=1e-4)
    dense_params = dict(dense.named_parameters())
    for name, param in fused.named_parameters():
        if name.startswith("clip.visual") or name in ("proxy_tokens", "temporal_embedding"):
            assert param.grad is not None, name
            torch.testing.assert_close(param.grad, dense_params[name].grad, atol=1e-5, rtol=1e-4, msg=name)


def test_grad_checkpointing_gives_the_same_gradients():
    plain = tiny_model(num_proxies=3)
    ckpt = tiny_model(num_proxies=3, grad_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    grads = []
    for model in (plain, ckpt):
        model.encode_video(frames(2, 3)).sum().backward()
        grads.append(model.clip.visual.conv1.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


# ----------------------------------------------------------------------------- temporal embedding


def test_temporal_table_twelve_frames_is_the_table():
    table = torch.randn(12, 8)
    assert temporal_table(table, 12) is table


def test_temporal_table_one_frame_is_mean_of_slots_five_and_six():
    table = torch.randn(12, 8)
    torch.testing.assert_close(temporal_table(table, 1)[0], (table[5] + table[6]) / 2)


@pytest.mark.parametrize("num_frames", [2, 7, 32])
def test_temporal_table_matches_np_interp(num_frames):
    table = torch.randn(12, 3, dtype=torch.float64)
    centres = np.clip((np.arange(num_frames) + 0.5) * 12 / num_frames - 0.5, 0, 11)
    expected = np.stack([np.interp(centres, np.arange(12), table[:, c].numpy()) for c in range(3)], axis=1)
    np.testing.assert_allclose(temporal_table(table, num_frames).numpy(), expected, atol=1e-12)


def test_temporal_embedding_changes_video_features():
    model = tiny_model(num_proxies=2).eval()
    clip = frames(1, 2)
    with torch.no_grad():
        before = model.encode_video(clip)
        model.temporal_embedding[:, 0] += 1.0  # same shift on every slot
        after = model.encode_video(clip)
    assert not torch.allclose(before, after)


# ----------------------------------------------------------------------------- parameters, errors, loading


def test_new_parameters_and_logit_scale():
    model = tiny_model(num_proxies=4, temporal_slots=12)
    assert model.proxy_tokens.shape == (3, 64)
    assert model.temporal_embedding.shape == (12, 64)
    assert tiny_model(num_proxies=1).proxy_tokens is None
    assert model.logit_scale is model.clip.logit_scale
    assert model.logit_scale.item() == pytest.approx(4.60)
    with torch.no_grad():
        model.logit_scale.fill_(9.0)
    model.clamp_logit_scale_()
    assert model.logit_scale.item() == pytest.approx(math.log(200))
    with torch.no_grad():
        model.logit_scale.fill_(-1.0)
    model.clamp_logit_scale_()
    assert model.logit_scale.item() == 0.0


def test_attention_choices_are_the_config_choices():
    assert set(ATTENTION_FNS) == {"fused", "dense"}


@pytest.mark.parametrize(
    "vision_override, message",
    [
        ({"attentional_pool": True}, "attentional pooling"),
        ({"pool_type": "avg"}, "attentional pooling"),
        ({"qk_norm": True}, "nn.MultiheadAttention"),
    ],
)
def test_unsupported_vision_towers_raise(vision_override, message):
    overrides = tiny_clip_overrides()
    overrides["vision_cfg"].update(vision_override)
    with pytest.raises(NotImplementedError, match=message):
        tiny_model(clip_overrides=overrides)


def test_wrong_frame_size_raises():
    with pytest.raises(ValueError, match="pixels"):
        tiny_model().encode_video(frames(1, 2, size=40))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_load_clip_weights_from_local_file(tmp_path, suffix):
    source = tiny_model(seed=7)
    path = tmp_path / f"clip{suffix}"
    state = {k: v.contiguous() for k, v in source.clip.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)

    target = build_model(tiny_config(pretrained=str(path)))
    for name, tensor in source.clip.state_dict().items():
        if name != "logit_scale":
            torch.testing.assert_close(target.clip.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    assert target.logit_scale.item() == pytest.approx(4.60)

    bad = tiny_model(clip_overrides={**tiny_clip_overrides(), "embed_dim": 16})
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_clip_weights(bad, str(path))


def test_attention_bench_quick_smoke(capsys):
    bench = runpy.run_path(str(Path(__file__).resolve().parents[2] / "bench" / "attention.py"), run_name="bench")
    bench["main"](["--quick", "--levels", "op", "--sizes", "B/32", "--width", "64", "--heads", "4"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and "original/fused" in lines[1] and "dense/fused" in lines[1]
