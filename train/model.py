"""CLIP-ViP video encoder: an open_clip CLIP whose image tower is run over video with proxy tokens.

Read top to bottom: config, embedding, attention (fused and dense reference), block, tower,
the `VideoCLIP` module, then the builders. The text tower is open_clip's, unchanged.

Shape suffixes (torchtitan convention):
    B batch            T frames           L patches per frame     M proxy tokens
    N = M + T*L tokens D vision width     H attention heads       K head dim (D // H)
    E embedding dim    S temporal slots   Z text context length
    frames_BTCHW / images_BCHW: C channels, H x W pixels (the only place H means height).

Video tower (CLIP-ViP's video proxy mechanism, arXiv 2209.06430; docs/model.md, "Architecture"):
M proxies (proxy 0 = CLIP's class embedding, the rest a new N(0,1) parameter) all get CLIP's CLS
position embedding; patches get the spatial position embedding plus a temporal embedding (S
zero-init slots, linearly resampled to T frames); ln_pre over all tokens; in every block proxies
attend to all N tokens and the patches of a frame attend to the M proxies and that frame's L
patches; the output is proxy 0 -> ln_post -> proj -> L2 norm.
"""

from __future__ import annotations

import logging
import math
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import CLIP, resize_pos_embed, resize_text_pos_embed
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

logger = logging.getLogger(__name__)

ATTENTION_CHOICES = ("fused", "dense")
LOGIT_SCALE_MAX = math.log(200.0)
_OVERRIDE_KEYS = ("embed_dim", "vision_cfg", "text_cfg", "quick_gelu")


# ----------------------------------------------------------------------------- config


@dataclass(kw_only=True)
class VideoCLIPConfig:
    """Video tower shape and how to build the underlying open_clip CLIP."""

    clip_model: str
    """open_clip model name, e.g. "ViT-B-32", "ViT-B-16" (OpenAI weights want "-quickgelu")."""
    num_proxies: int = 4
    """M video proxy tokens; proxy 0 is CLIP's class embedding."""
    temporal_slots: int = 12
    """S slots of the zero-init temporal embedding, resampled linearly to the frame count."""
    attention: str = "fused"
    """"fused": two mask-free SDPA calls per layer; "dense": one SDPA with an (N, N) mask."""
    grad_checkpointing: bool = False
    """Recompute each transformer block in backward (both towers)."""
    pretrained: str | None = None
    """Local path of open_clip/OpenAI-format CLIP weights (.pt/.pth/.bin/.safetensors, or OpenAI's TorchScript .pt)."""
    clip_overrides: dict[str, Any] = field(default_factory=dict)
    """Merged into the open_clip model config: embed_dim, quick_gelu, vision_cfg/text_cfg keys."""
    logit_scale_init: float = 4.60
    """Initial log of the contrastive logit scale (exp(4.60) ~ 99.5)."""

    def __post_init__(self) -> None:
        if self.clip_model not in open_clip.list_models():
            raise ValueError(f"clip_model: unknown open_clip model {self.clip_model!r}")
        if self.num_proxies < 1:
            raise ValueError(f"num_proxies: must be >= 1, got {self.num_proxies}")
        if self.temporal_slots < 1:
            raise ValueError(f"temporal_slots: must be >= 1, got {self.temporal_slots}")
        if self.attention not in ATTENTION_CHOICES:
            raise ValueError(f"attention: must be one of {ATTENTION_CHOICES}, got {self.attention!r}")
        if self.pretrained is not None and not self.pretrained:
            raise ValueError("pretrained: must be a file path or None, got an empty string")
        unknown = sorted(set(self.clip_overrides) - set(_OVERRIDE_KEYS))
        if unknown:
            raise ValueError(f"clip_overrides: unknown keys {unknown}; allowed {list(_OVERRIDE_KEYS)}")
        if not 0.0 <= self.logit_scale_init <= LOGIT_SCALE_MAX:
            raise ValueError(f"logit_scale_init: must be in [0, ln 200], got {self.logit_scale_init}")


def tiny_clip_overrides(*, image_size: int = 32, patch_size: int = 8, vocab_size: int = 1000) -> dict[str, Any]:
    """A tiny open_clip CLIP for tests: 2-layer width-64 towers, 4 heads, embed dim 32, QuickGELU."""
    return {
        "embed_dim": 32,
        "quick_gelu": True,
        "vision_cfg": {"image_size": image_size, "patch_size": patch_size, "width": 64, "head_width": 16, "layers": 2},
        "text_cfg": {"context_length": 77, "vocab_size": vocab_size, "width": 64, "heads": 4, "layers": 2},
    }


# ----------------------------------------------------------------------------- embedding


def temporal_table(temporal_SD: Tensor, num_frames: int) -> Tensor:
    """Resample the S-slot temporal embedding to T frames (linear, align_corners=False) -> [T, D]."""
    if num_frames == temporal_SD.shape[0]:
        return temporal_SD
    resampled_1DT = F.interpolate(temporal_SD.t()[None], size=num_frames, mode="linear", align_corners=False)
    return resampled_1DT[0].t()


def proxy_table(visual: VisionTransformer, proxy_tokens: Tensor | None) -> Tensor:
    """The M proxies: [class_embedding; proxy_tokens] + CLS position embedding -> [M, D]."""
    proxies_MD = visual.class_embedding[None]
    if proxy_tokens is not None:
        proxies_MD = torch.cat([proxies_MD, proxy_tokens], dim=0)
    return proxies_MD + visual.positional_embedding[:1]


def patchify(visual: VisionTransformer, frames_BTCHW: Tensor) -> Tensor:
    """Patch conv on every frame -> [B, T, L, D]."""
    B, T = frames_BTCHW.shape[:2]
    if tuple(frames_BTCHW.shape[-2:]) != tuple(visual.image_size):
        raise ValueError(f"frames are {tuple(frames_BTCHW.shape[-2:])} pixels, the model wants {visual.image_size}")
    grid_BT_D_hw = visual.conv1(frames_BTCHW.flatten(0, 1))
    return grid_BT_D_hw.flatten(2).transpose(1, 2).unflatten(0, (B, T))


def embed_video(
    visual: VisionTransformer, proxy_tokens: Tensor | None, temporal_SD: Tensor, frames_BTCHW: Tensor
) -> Tensor:
    """Token sequence [proxies, frame 0 patches, frame 1 patches, ...] after ln_pre -> [B, N, D]."""
    patches_BTLD = patchify(visual, frames_BTCHW)
    B, T = patches_BTLD.shape[:2]
    dtype = patches_BTLD.dtype
    space_LD = visual.positional_embedding[1:].to(dtype)
    time_TD = temporal_table(temporal_SD, T).to(dtype)
    patches_BTLD = patches_BTLD + space_LD + time_TD[:, None]
    proxies_BMD = proxy_table(visual, proxy_tokens).to(dtype).expand(B, -1, -1)
    tokens_BND = torch.cat([proxies_BMD, patches_BTLD.flatten(1, 2)], dim=1)
    return visual.ln_pre(tokens_BND)


# ----------------------------------------------------------------------------- attention
# An attention function maps per-head q, k, v [B, N, H, K] (views of the packed in_proj output)
# to the pre-out_proj output [B, N, D] for the proxy-guided pattern with M proxies and T frames.

AttendFn = Callable[[Tensor, Tensor, Tensor, int, int, float], Tensor]


def _frame_keys(x_BNHK: Tensor, num_proxies: int, num_frames: int) -> Tensor:
    """Per-frame keys/values [proxies; frame patches] -> [B*T, H, M+L, K] (one copy, by torch.cat)."""
    B, _, H, K = x_BNHK.shape
    proxies_BMHK, patches_BTLHK = x_BNHK.split([num_proxies, x_BNHK.shape[1] - num_proxies], dim=1)
    proxies_BTMHK = proxies_BMHK[:, None].expand(B, num_frames, num_proxies, H, K)
    patches_BTLHK = patches_BTLHK.unflatten(1, (num_frames, -1))
    return torch.cat([proxies_BTMHK, patches_BTLHK], dim=2).flatten(0, 1).transpose(1, 2)


def fused_proxy_attention(
    q_BNHK: Tensor, k_BNHK: Tensor, v_BNHK: Tensor, num_proxies: int, num_frames: int, dropout_p: float = 0.0
) -> Tensor:
    """Proxy-guided attention as two mask-free SDPA calls (flash/efficient kernels apply).

    1. proxy queries [B, H, M, K] over all N keys/values;
    2. patch queries [B*T, H, L, K] over [M proxy; L own-frame] keys/values.
    `split` (not slicing) keeps the backward a concatenation instead of zero-filled scatters.
    """
    B, N, H, K = q_BNHK.shape
    M, T = num_proxies, num_frames
    L = (N - M) // T
    q_proxies_BMHK, q_patches_BTLHK = q_BNHK.split([M, N - M], dim=1)
    out_proxies_BHMK = F.scaled_dot_product_attention(
        q_proxies_BMHK.transpose(1, 2), k_BNHK.transpose(1, 2), v_BNHK.transpose(1, 2), dropout_p=dropout_p
    )
    q_frames_BT_H_L_K = q_patches_BTLHK.reshape(B * T, L, H, K).transpose(1, 2)
    out_frames_BT_H_L_K = F.scaled_dot_product_attention(
        q_frames_BT_H_L_K, _frame_keys(k_BNHK, M, T), _frame_keys(v_BNHK, M, T), dropout_p=dropout_p
    )
    out_proxies_BMD = out_proxies_BHMK.transpose(1, 2).reshape(B, M, H * K)
    out_patches_BTLD = out_frames_BT_H_L_K.transpose(1, 2).reshape(B, T * L, H * K)
    return torch.cat([out_proxies_BMD, out_patches_BTLD], dim=1)


def proxy_attention_mask(
    num_proxies: int, num_frames: int, patches_per_frame: int, device: torch.device | None = None
) -> Tensor:
    """Boolean [N, N] mask, True = may attend: proxies <-> everything, patches <-> own frame."""
    frame_of_token_N = torch.cat(
        [
            torch.full((num_proxies,), -1, device=device),
            torch.arange(num_frames, device=device).repeat_interleave(patches_per_frame),
        ]
    )
    is_proxy_N = frame_of_token_N < 0
    same_frame_NN = frame_of_token_N[:, None] == frame_of_token_N[None, :]
    return same_frame_NN | is_proxy_N[:, None] | is_proxy_N[None, :]


def dense_proxy_attention(
    q_BNHK: Tensor, k_BNHK: Tensor, v_BNHK: Tensor, num_proxies: int, num_frames: int, dropout_p: float = 0.0
) -> Tensor:
    """Reference: one SDPA over all N tokens with the boolean pattern mask. O(N^2) memory."""
    B, N, H, K = q_BNHK.shape
    mask_NN = proxy_attention_mask(num_proxies, num_frames, (N - num_proxies) // num_frames, q_BNHK.device)
    out_BHNK = F.scaled_dot_product_attention(
        q_BNHK.transpose(1, 2), k_BNHK.transpose(1, 2), v_BNHK.transpose(1, 2), attn_mask=mask_NN, dropout_p=dropout_p
    )
    return out_BHNK.transpose(1, 2).reshape(B, N, H * K)


ATTENTION_FNS: dict[str, AttendFn] = {"fused": fused_proxy_attention, "dense": dense_proxy_attention}


# ----------------------------------------------------------------------------- block and tower


def block_attention(
    attn: nn.MultiheadAttention, x_BND: Tensor, attend: AttendFn, num_proxies: int, num_frames: int
) -> Tensor:
    """The block's own in_proj -> proxy-guided attention -> out_proj."""
    B, N, D = x_BND.shape
    H = attn.num_heads
    qkv_BN3D = F.linear(x_BND, attn.in_proj_weight, attn.in_proj_bias)
    q_BNHK, k_BNHK, v_BNHK = qkv_BN3D.view(B, N, 3, H, D // H).unbind(2)
    dropout_p = attn.dropout if attn.training else 0.0
    out_BND = attend(q_BNHK, k_BNHK, v_BNHK, num_proxies, num_frames, dropout_p)
    return attn.out_proj(out_BND)


def video_block(
    block: ResidualAttentionBlock, tokens_BND: Tensor, attend: AttendFn, num_proxies: int, num_frames: int
) -> Tensor:
    """ln_1 -> proxy-guided attention -> layer scale -> residual; ln_2 -> mlp -> layer scale -> residual."""
    attended_BND = block_attention(block.attn, block.ln_1(tokens_BND), attend, num_proxies, num_frames)
    tokens_BND = tokens_BND + block.ls_1(attended_BND)
    return tokens_BND + block.ls_2(block.mlp(block.ln_2(tokens_BND)))


def run_video_blocks(
    blocks: nn.ModuleList,
    tokens_BND: Tensor,
    attend: AttendFn,
    num_proxies: int,
    num_frames: int,
    grad_checkpointing: bool = False,
) -> Tensor:
    """All transformer blocks of the vision tower, optionally checkpointed per block."""
    for block in blocks:
        if grad_checkpointing and torch.is_grad_enabled():
            tokens_BND = checkpoint(
                video_block, block, tokens_BND, attend, num_proxies, num_frames, use_reentrant=False
            )
        else:
            tokens_BND = video_block(block, tokens_BND, attend, num_proxies, num_frames)
    return tokens_BND


def check_visual_supported(visual: nn.Module) -> None:
    """Raise NotImplementedError unless `visual` is a 'tok'-pooled open_clip ViT with nn.MultiheadAttention."""
    if not isinstance(visual, VisionTransformer):
        raise NotImplementedError(f"only open_clip VisionTransformer towers are supported, got {type(visual).__name__}")
    if visual.attn_pool is not None or visual.pool_type != "tok":
        raise NotImplementedError("attentional pooling / non-'tok' pool types are not supported: proxy 0 is the output")
    if not isinstance(visual.patch_dropout, nn.Identity):
        raise NotImplementedError("patch dropout is not supported by the video tower")
    if visual.proj is None:
        raise NotImplementedError("the vision tower needs its output projection `proj`")
    for index, block in enumerate(visual.transformer.resblocks):
        attn = getattr(block, "attn", None)
        if not isinstance(attn, nn.MultiheadAttention):
            raise NotImplementedError(
                f"vision block {index} ({type(block).__name__}) uses {type(attn).__name__}; only "
                "nn.MultiheadAttention is supported (no qk-norm / scaled-cosine / custom blocks)"
            )
        if attn.in_proj_weight is None or attn.bias_k is not None or attn.add_zero_attn:
            raise NotImplementedError(f"vision block {index}: unsupported nn.MultiheadAttention options")


# ----------------------------------------------------------------------------- model


class VideoCLIP(nn.Module):
    """CLIP-ViP: open_clip CLIP (`self.clip`) + proxy tokens + temporal embedding.

    Parameters added to CLIP: `proxy_tokens` [M-1, D] (None when M == 1) and
    `temporal_embedding` [S, D]. `logit_scale` is open_clip's own parameter (`clip.logit_scale`).
    """

    def __init__(self, cfg: VideoCLIPConfig, clip: CLIP):
        super().__init__()
        check_visual_supported(clip.visual)
        self.cfg = cfg
        self.clip = clip
        width = clip.visual.conv1.out_channels
        if cfg.num_proxies > 1:
            self.proxy_tokens = nn.Parameter(torch.randn(cfg.num_proxies - 1, width))
        else:
            self.register_parameter("proxy_tokens", None)
        self.temporal_embedding = nn.Parameter(torch.zeros(cfg.temporal_slots, width))
        self.attend = ATTENTION_FNS[cfg.attention]
        self.reset_logit_scale_()
        clip.transformer.grad_checkpointing = cfg.grad_checkpointing

    @property
    def logit_scale(self) -> nn.Parameter:
        """Log of the contrastive logit scale (open_clip's parameter, 0-dim)."""
        return self.clip.logit_scale

    @torch.no_grad()
    def reset_logit_scale_(self) -> None:
        self.clip.logit_scale.fill_(self.cfg.logit_scale_init)

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Clamp in place to [0, ln 200]; call after every optimiser step."""
        self.clip.logit_scale.clamp_(0.0, LOGIT_SCALE_MAX)

    def encode_video(self, frames_BTCHW: Tensor) -> Tensor:
        """Video embedding: proxy 0 -> ln_post -> proj -> L2 norm -> [B, E]."""
        visual = self.clip.visual
        T = frames_BTCHW.shape[1]
        tokens_BND = embed_video(visual, self.proxy_tokens, self.temporal_embedding, frames_BTCHW)
        tokens_BND = run_video_blocks(
            visual.transformer.resblocks, tokens_BND, self.attend, self.cfg.num_proxies, T, self.cfg.grad_checkpointing
        )
        pooled_BD = visual.ln_post(tokens_BND[:, 0])
        return F.normalize(pooled_BD @ visual.proj, dim=-1)

    def encode_image(self, images_BCHW: Tensor) -> Tensor:
        """An image is a one-frame video (it gets the resampled middle temporal slot) -> [B, E]."""
        return self.encode_video(images_BCHW[:, None])

    def encode_text(self, tokens_BZ: Tensor) -> Tensor:
        """open_clip's text tower, unchanged, then L2 norm -> [B, E]."""
        return self.clip.encode_text(tokens_BZ, normalize=True)


# ----------------------------------------------------------------------------- builders


def clip_model_config(cfg: VideoCLIPConfig) -> dict[str, Any]:
    """open_clip's config for `cfg.clip_model` with `cfg.clip_overrides` merged in (one level deep)."""
    base = open_clip.get_model_config(cfg.clip_model)
    if base is None:
        raise ValueError(f"clip_model: open_clip has no config for {cfg.clip_model!r}")
    merged = {key: (dict(value) if isinstance(value, dict) else value) for key, value in base.items()}
    for key, value in cfg.clip_overrides.items():
        if isinstance(value, dict):
            merged[key] = {**merged.get(key, {}), **value}
        else:
            merged[key] = value
    unsupported = sorted(set(merged) - set(_OVERRIDE_KEYS))
    if unsupported:
        raise NotImplementedError(f"open_clip config keys {unsupported} of {cfg.clip_model!r} are not supported")
    return merged


def build_clip(cfg: VideoCLIPConfig) -> CLIP:
    """A randomly initialised open_clip CLIP from the merged config."""
    model_cfg = clip_model_config(cfg)
    return CLIP(
        embed_dim=model_cfg["embed_dim"],
        vision_cfg=model_cfg["vision_cfg"],
        text_cfg=model_cfg["text_cfg"],
        quick_gelu=model_cfg.get("quick_gelu", False),
    )


def load_clip_weights(model: VideoCLIP, path: str) -> None:
    """Load open_clip/OpenAI-format CLIP weights into `model.clip`, strict.

    A state dict (.pt/.pth/.bin or .safetensors) goes through open_clip's `load_checkpoint`
    (torch.load with weights_only=True, or safetensors). A TorchScript archive (OpenAI's original
    CLIP .pt files) is read with `torch.jit.load`, which rebuilds only TorchScript's own types (no
    arbitrary pickled Python objects), and its state dict loaded (OpenAI's names are open_clip's).
    The logit scale is then reset to `cfg.logit_scale_init` (CLIP-ViP starts post-pretraining at 4.60).
    """
    if is_torchscript_archive(path):
        state = torchscript_state_dict(path)
        resize_pos_embed(state, model.clip)
        resize_text_pos_embed(state, model.clip)
        model.clip.load_state_dict(state, strict=True)
    else:
        open_clip.load_checkpoint(model.clip, path, strict=True, weights_only=True)
    model.reset_logit_scale_()
    logger.info("loaded CLIP weights from %s", path)


def is_torchscript_archive(path: str) -> bool:
    """A TorchScript zip (``constants.pkl`` and ``code/`` beside the data), as torch.jit.save writes them."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.rsplit("/", 1)[-1] == "constants.pkl" for name in archive.namelist())


def torchscript_state_dict(path: str) -> dict[str, Tensor]:
    """The tensors of a TorchScript CLIP, without OpenAI's three shape constants (``input_resolution``, ...)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated; OpenAI's files stay TorchScript
        module = torch.jit.load(path, map_location="cpu")
    state = dict(module.state_dict())
    for key in ("input_resolution", "context_length", "vocab_size"):
        state.pop(key, None)
    return state


def build_model(cfg: VideoCLIPConfig) -> VideoCLIP:
    """VideoCLIP from config; loads `cfg.pretrained` CLIP weights when given."""
    model = VideoCLIP(cfg, build_clip(cfg))
    if cfg.pretrained is not None:
        load_clip_weights(model, cfg.pretrained)
    return model
