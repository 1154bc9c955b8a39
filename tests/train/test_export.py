"""Weights out and in: `python -m train.export` formats, read back by us, open_clip and transformers;
``model.pretrained`` from OpenAI's TorchScript CLIP archives, hub repos and open_clip tags in local caches
that the tests lay out as huggingface_hub and open_clip do (nothing is downloaded).

The model is the tiny training config (launch/configs/train/tiny.yaml: open_clip's ViT-B-32 with
``clip_overrides`` making 2-layer width-64 towers) with every tensor perturbed, so layer norms and
biases are not at their initial values. Its CLIP config is not one of open_clip's named models, so
the open_clip export writes it as a model config JSON that `open_clip.add_model_config` registers;
that runs in a child process, leaving this process's open_clip registry as it was.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from collections.abc import Callable
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

from tests.train.fixtures_train import PYTHON, REPO, TINY_CONFIG, env
from train.checkpoint import load_model
from train.config import dump_config, load_config
from train.export import main as export_main
from train.loop import build_task
from train.model import VideoCLIPConfig, build_model, clip_model_config
from train.model_record import model_record
from train.pretrained import resolve_pretrained
from train.tokenizer import get_tokenizer
from train.weights import read_file_record, read_state_dict

ADDED = ("vision_model.embeddings.added_cls", "vision_model.embeddings.temporal_embedding")
"""What CLIP-ViP adds to HF's CLIPModel: the proxy tokens and the temporal embedding (train/weights.py)."""
CAPTIONS = ["the red square goes left", "a blue circle moving up", "green"]


def tiny_config():
    return load_config(TINY_CONFIG, ["run_dir=unused"])


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> str:
    """A folder as a run leaves it for export: config.yaml and a weights file with perturbed tensors."""
    root = tmp_path_factory.mktemp("run")
    cfg = tiny_config()
    torch.manual_seed(0)
    model = build_model(VideoCLIPConfig(**cfg.model.video_clip_kwargs()))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    dump_config(cfg, str(root / "config.yaml"))
    torch.save(model.state_dict(), root / "model.pt")
    return str(root / "model.pt")


@pytest.fixture(scope="module")
def ours(run):
    return load_model(run, device="cpu").model


def tokens() -> torch.Tensor:
    return get_tokenizer(77)(CAPTIONS)


def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def hf_clip() -> CLIPModel:
    """transformers' CLIP with the tiny config's shapes (launch/configs/train/tiny.yaml)."""
    common = dict(
        hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, hidden_act="quick_gelu"
    )
    text = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, eos_token_id=49407, **common)
    vision = CLIPVisionConfig(image_size=32, patch_size=8, **common)
    return CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=32)).eval()


def pooled(output) -> torch.Tensor:
    return output.pooler_output if hasattr(output, "pooler_output") else output


def assert_same(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=0, atol=0, msg=key)


def test_safetensors_round_trips_through_our_loader(run, ours, tmp_path):
    out = str(tmp_path / "model.safetensors")
    assert export_main([run, "--format", "safetensors", "--out", out]) == 0
    assert_same(load_file(out), ours.state_dict())
    config = os.path.join(os.path.dirname(run), "config.yaml")
    assert_same(load_model(out, config, device="cpu").model.state_dict(), ours.state_dict())
    assert export_main([run, "--format", "safetensors", "--out", str(tmp_path / "model.pt")]) == 2


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_clipvip_round_trips_and_loads_into_transformers(run, ours, tmp_path, suffix):
    out = str(tmp_path / f"clipvip{suffix}")
    assert export_main([run, "--format", "clipvip", "--out", out]) == 0
    exported = read_state_dict(out)
    assert all(key.startswith("clipmodel.") for key in exported)
    config = os.path.join(os.path.dirname(run), "config.yaml")
    assert_same(load_model(out, config, device="cpu").model.state_dict(), ours.state_dict())  # our import

    hf = hf_clip()
    result = hf.load_state_dict(
        {key.removeprefix("clipmodel."): value for key, value in exported.items()}, strict=False
    )
    assert sorted(result.unexpected_keys) == sorted(ADDED) and result.missing_keys == []
    with torch.no_grad():
        hf_text = F.normalize(pooled(hf.get_text_features(input_ids=tokens())), dim=-1)
        torch.testing.assert_close(hf_text, ours.encode_text(tokens()), rtol=0, atol=1e-5)
    assert hf.logit_scale.item() == ours.logit_scale.item()


@pytest.mark.slow  # open_clip loads the export in a fresh process: ~8 s on 2 cores
def test_open_clip_creates_the_model_by_name(run, ours, tmp_path):
    """``open_clip.create_model(name, pretrained=PATH)`` in a fresh process, after registering the JSON."""
    out = str(tmp_path / "export" / "vidproxy-tiny.safetensors")
    assert export_main([run, "--format", "open_clip", "--out", out]) == 0
    config = str(tmp_path / "export" / "vidproxy-tiny.json")
    with open(config) as f:
        assert json.load(f)["vision_cfg"]["width"] == 64
    inputs, features = str(tmp_path / "inputs.pt"), str(tmp_path / "features.pt")
    torch.save({"tokens": tokens(), "images": images()}, inputs)
    script = textwrap.dedent(
        f"""
        import open_clip, torch
        open_clip.add_model_config({config!r})
        model = open_clip.create_model("vidproxy-tiny", pretrained={out!r}).eval()
        inputs = torch.load({inputs!r})
        with torch.no_grad():
            torch.save({{
                "state": model.state_dict(),
                "text": model.encode_text(inputs["tokens"], normalize=True),
                "image": model.encode_image(inputs["images"], normalize=True),
            }}, {features!r})
        """
    )
    done = subprocess.run([PYTHON, "-c", script], cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = torch.load(features, weights_only=True)
    assert_same(
        loaded["state"], {k.removeprefix("clip."): v for k, v in ours.state_dict().items() if k.startswith("clip.")}
    )
    torch.testing.assert_close(loaded["text"], ours.encode_text(tokens()), rtol=0, atol=1e-6)

    # open_clip's image tower (no proxies, no frames) is CLIP's: the same as transformers' from the CLIP-ViP export
    clipvip = str(tmp_path / "clipvip.safetensors")
    assert export_main([run, "--format", "clipvip", "--out", clipvip]) == 0
    hf = hf_clip()
    hf.load_state_dict({k.removeprefix("clipmodel."): v for k, v in load_file(clipvip).items()}, strict=False)
    with torch.no_grad():
        hf_image = F.normalize(pooled(hf.get_image_features(pixel_values=images())), dim=-1)
    torch.testing.assert_close(loaded["image"], hf_image, rtol=0, atol=1e-5)


def test_export_errors_are_one_line(run, tmp_path, capsys):
    builtin = str(tmp_path / "ViT-B-32.safetensors")  # registering it would replace open_clip's own ViT-B-32
    assert export_main([run, "--format", "open_clip", "--out", builtin]) == 2
    assert "one of open_clip's own model names" in capsys.readouterr().err and not os.path.exists(builtin)
    assert export_main([str(tmp_path / "nothing"), "--format", "clipvip", "--out", str(tmp_path / "x.pt")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


@pytest.mark.slow  # the command in a fresh process: ~8 s on 2 cores
def test_python_m_train_export_runs(run, tmp_path):
    out = str(tmp_path / "clipvip.pt")
    cmd = [PYTHON, "-m", "train.export", run, "--format", "clipvip", "--out", out]
    done = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"wrote {out}, {out}.model.json (clipvip)" in done.stdout and os.path.exists(out)
    assert read_file_record(out) == model_record(tiny_config().model)  # the record beside a torch.save file


# ----------------------------------------------------------------------------- OpenAI's TorchScript archives


class Tree(nn.Module):
    """A scriptable module holding tensors under any dotted names (OpenAI's CLIP archives, in small)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def torchscript_clip(state: dict[str, torch.Tensor], path: str) -> None:
    """A TorchScript archive with ``state`` as fp16 parameters and OpenAI's shape constants, as OpenAI ships CLIP."""
    root = Tree()
    for name, value in state.items():
        *parents, leaf = name.split(".")
        module = root
        for part in parents:
            if not hasattr(module, part):
                module.add_module(part, Tree())
            module = getattr(module, part)
        module.register_parameter(leaf, nn.Parameter(value.detach().half(), requires_grad=False))
    for name, value in (("input_resolution", 32), ("context_length", 77), ("vocab_size", 49408)):
        root.register_buffer(name, torch.tensor(value))
    torch.jit.save(torch.jit.script(root), path)


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_openai_torchscript_archive_loads_as_pretrained(tmp_path):
    cfg = tiny_config()
    torch.manual_seed(5)
    source = build_model(VideoCLIPConfig(**cfg.model.video_clip_kwargs())).clip.state_dict()  # OpenAI's names
    archive = str(tmp_path / "ViT-tiny.pt")
    torchscript_clip(source, archive)

    kwargs = {**cfg.model.video_clip_kwargs(), "pretrained": archive}
    model = build_model(VideoCLIPConfig(**kwargs))
    loaded = model.clip.state_dict()
    for key, value in source.items():
        if key != "logit_scale":
            torch.testing.assert_close(loaded[key], value.half().float(), rtol=0, atol=0, msg=key)
    assert model.logit_scale.item() == pytest.approx(cfg.model.logit_scale_init)  # reset for post-pretraining

    del source["visual.proj"]  # strict: an archive missing a tensor is refused, naming it
    torchscript_clip(source, archive)
    with pytest.raises(RuntimeError, match="visual.proj"):
        build_model(VideoCLIPConfig(**kwargs))


class Planted:
    """Unpickling this would create a file: the plain-pickle danger that weights-only loading refuses."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pickle_that_runs_code_is_refused(tmp_path):
    marker, bad = str(tmp_path / "planted"), str(tmp_path / "bad.pt")
    torch.save({"visual.proj": torch.zeros(1), "payload": Planted(marker)}, bad)
    kwargs = {**tiny_config().model.video_clip_kwargs(), "pretrained": bad}
    with pytest.raises(Exception, match="Weights only load failed"):
        build_model(VideoCLIPConfig(**kwargs))
    assert not os.path.exists(marker)


# ----------------------------------------------------------------------------- model.pretrained from the local caches


def hub_repo(cache: Path, repo_id: str, files: dict[str, Callable[[str], None]]) -> Path:
    """A hub repo as huggingface_hub caches it: models--ORG--NAME/{refs/main, snapshots/<commit>/<files>}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for name, write in files.items():
        write(str(snapshot / name))
    return snapshot


def tiny_clip_state(cfg, seed: int) -> dict[str, torch.Tensor]:
    """An open_clip CLIP state dict of the tiny towers (what a hub repo or a tag's file holds)."""
    torch.manual_seed(seed)
    state = build_model(VideoCLIPConfig(**{**cfg.model.video_clip_kwargs(), "pretrained": None})).clip.state_dict()
    return {key: value.contiguous() for key, value in state.items()}


def assert_clip_loaded(task, source: dict[str, torch.Tensor]) -> None:
    loaded = task.model.clip.state_dict()
    for key, value in source.items():
        if key != "logit_scale":  # reset to logit_scale_init for post-pretraining
            assert torch.equal(loaded[key], value), key


@pytest.fixture
def caches(tmp_path, monkeypatch) -> dict[str, Path]:
    """Empty huggingface_hub and open_clip caches in tmp_path, found through the environment."""
    hub, home = tmp_path / "hub", tmp_path / "home"
    hub.mkdir()
    home.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HOME", str(home))
    return {"hub": hub, "clip": home / ".cache" / "clip"}


@pytest.mark.parametrize("weights", ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"])
def test_pretrained_hf_hub_repo_loads_from_the_cache(caches, weights):
    cfg = load_config(TINY_CONFIG, ["run_dir=unused", "model.pretrained=hf-hub:someone/tiny-clip"])
    source = tiny_clip_state(cfg, seed=11)
    config = {"model_cfg": clip_model_config(VideoCLIPConfig(**tiny_config().model.video_clip_kwargs()))}
    save = (lambda p: save_file(source, p)) if weights.endswith(".safetensors") else (lambda p: torch.save(source, p))
    snapshot = hub_repo(
        caches["hub"],
        "someone/tiny-clip",
        {weights: save, "open_clip_config.json": lambda p: Path(p).write_text(json.dumps(config))},
    )
    assert resolve_pretrained(cfg.model) == str(snapshot / weights)
    assert_clip_loaded(build_task(cfg, 0, 1), source)

    gelu = load_config(TINY_CONFIG, ["run_dir=x", "model.pretrained=hf-hub:someone/tiny-clip", GELU_OVERRIDE])
    with pytest.raises(ValueError) as info:  # the repo's open_clip_config.json says QuickGELU
        resolve_pretrained(gelu.model)
    assert str(info.value) == (
        "model.pretrained=hf-hub:someone/tiny-clip: hub repo someone/tiny-clip was trained with activation "
        "quick_gelu, model.clip_model ViT-B-32 has gelu: pick the matching open_clip name (-quickgelu for "
        "QuickGELU) or set clip_overrides.quick_gelu"
    )


GELU_OVERRIDE = "model.clip_overrides.quick_gelu=false"


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_pretrained_tags_load_from_the_hub_cache_or_open_clips_own(caches):
    """laion2b_s34b_b79k (GELU) lives in a hub repo; openai (QuickGELU) here in open_clip's URL cache as
    OpenAI's TorchScript archive. The tiny towers stand in for ViT-B-32's: the tag names the files only."""
    laion = load_config(TINY_CONFIG, ["run_dir=x", "model.pretrained=laion2b_s34b_b79k", GELU_OVERRIDE])
    source = tiny_clip_state(laion, seed=12)
    hub_repo(
        caches["hub"],
        "laion/CLIP-ViT-B-32-laion2B-s34B-b79K",
        {"open_clip_pytorch_model.bin": lambda p: torch.save(source, p)},
    )
    assert_clip_loaded(build_task(laion, 0, 1), source)

    openai = load_config(TINY_CONFIG, ["run_dir=x", "model.pretrained=openai"])
    source = tiny_clip_state(openai, seed=13)
    caches["clip"].mkdir(parents=True)
    torchscript_clip(source, str(caches["clip"] / "ViT-B-32.pt"))
    assert resolve_pretrained(openai.model) == str(caches["clip"] / "ViT-B-32.pt")
    assert_clip_loaded(build_task(openai, 0, 1), {k: v.half().float() for k, v in source.items()})

    with pytest.raises(ValueError) as info:  # OpenAI's weights under GELU: refused
        resolve_pretrained(load_config(TINY_CONFIG, ["run_dir=x", "model.pretrained=openai", GELU_OVERRIDE]).model)
    assert str(info.value).startswith(
        "model.pretrained=openai: open_clip's ViT-B-32 tag 'openai' was trained with activation quick_gelu, "
        "model.clip_model ViT-B-32 has gelu"
    )


def test_a_pretrained_value_that_is_nowhere_is_one_line(caches, tmp_path, capsys):
    from train.main import main

    def refused(value: str) -> str:
        capsys.readouterr()
        args = ["--config", TINY_CONFIG, f"run_dir={tmp_path / 'run'}", "data.train=[x]", f"model.pretrained={value}"]
        assert main(args) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        return line

    assert refused("laion2b_s34b_b79k") == (
        "config error: model.pretrained=laion2b_s34b_b79k: open_clip's ViT-B-32 tag 'laion2b_s34b_b79k' is not in "
        f"the local caches (looked for laion/CLIP-ViT-B-32-laion2B-s34B-b79K (open_clip_model.safetensors or "
        f"open_clip_pytorch_model.bin) in {caches['hub']}); download them on a machine with network "
        "(docs/model.md, 'Pretrained weights') or pass a file"
    )
    assert refused("openai").endswith(
        f"in {caches['hub']}; {caches['clip'] / 'ViT-B-32.pt'}); download them on a machine with network "
        "(docs/model.md, 'Pretrained weights') or pass a file"
    )
    assert refused("hf-hub:someone/absent") == (
        "config error: model.pretrained=hf-hub:someone/absent: someone/absent is not in the local huggingface_hub "
        f"cache (looked for open_clip_model.safetensors or open_clip_pytorch_model.bin in {caches['hub']}); "
        "download it on a machine with network (docs/model.md, 'Pretrained weights') or set HF_HUB_CACHE"
    )
    missing = str(tmp_path / "clip.pt")
    assert refused(missing) == (
        f"config error: model.pretrained={missing}: no such file or folder, and not an open_clip tag of ViT-B-32 "
        f"(its tags: {', '.join(open_clip.list_pretrained_tags_by_model('ViT-B-32'))}) nor hf-hub:ORG/REPO"
    )
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_openai_archive_under_gelu_is_refused(tmp_path):
    archive = str(tmp_path / "ViT-tiny.pt")
    torchscript_clip(tiny_clip_state(tiny_config(), seed=5), archive)
    with pytest.raises(ValueError, match="OpenAI's TorchScript archive .* was trained with activation quick_gelu"):
        resolve_pretrained(load_config(TINY_CONFIG, ["run_dir=x", f"model.pretrained={archive}", GELU_OVERRIDE]).model)
