"""Backbones named as the field names them (timm, torchvision, open_clip), local weight files,
and the device option. Weights are random state dicts written by the tests: no download."""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import final_accuracy_by_hand

from kvb_avalanche.device import resolve_device
from kvb_avalanche.encoders import build_encoder, check_encoder, embed_images, preprocess
from kvb_avalanche.experiments import ConfigError, ExperimentConfig

timm = pytest.importorskip("timm")


def _images(n=3, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def vit_weights(tmp_path_factory):
    """A random timm ``test_vit`` (with its classifier) saved as .pth and .safetensors."""
    from safetensors.torch import save_file

    torch.manual_seed(1)
    ref = timm.create_model("test_vit", pretrained=False)
    folder = tmp_path_factory.mktemp("timm")
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    torch.save(state, folder / "test_vit.pth")
    save_file(state, str(folder / "test_vit.safetensors"))
    return ref.eval(), folder


@pytest.mark.parametrize("suffix", ["pth", "safetensors"])
def test_timm_encoder_reads_a_local_file_and_takes_its_preprocessing(vit_weights, suffix):
    ref, folder = vit_weights
    path = folder / f"test_vit.{suffix}"
    enc = build_encoder("timm:test_vit", weights=path)
    cfg = timm.data.resolve_data_config({}, model=ref)
    assert enc.resolution == cfg["input_size"][-1] and enc.mean == tuple(cfg["mean"])
    assert enc.std == tuple(cfg["std"]) and enc.interpolation == cfg["interpolation"]
    assert enc.weights_id == _sha256(path) and enc.dim == ref.num_features
    assert not any(p.requires_grad for p in enc.module.parameters())
    images = _images()
    x = preprocess(images, enc.resolution, enc.mean, enc.std, enc.interpolation)
    with torch.inference_mode():
        expected = ref.forward_head(ref.forward_features(x), pre_logits=True)
    got = embed_images(enc, images, progress=False)  # the encoder's own resolution
    assert got.shape == (3, ref.num_features)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_torchvision_encoder_drops_the_classifier_and_follows_the_named_weights(tmp_path):
    import torchvision

    torch.manual_seed(2)
    ref = torchvision.models.mobilenet_v3_small()
    path = tmp_path / "mnv3.pt"
    torch.save({"state_dict": ref.state_dict()}, path)  # a checkpoint dict, as trainers save
    enc = build_encoder("torchvision:mobilenet_v3_small:IMAGENET1K_V1", weights=path)
    assert (enc.dim, enc.resolution, enc.interpolation) == (1024, 224, "bilinear")
    assert enc.mean == (0.485, 0.456, 0.406) and enc.weights_id == _sha256(path)
    ref.classifier[-1] = torch.nn.Identity()
    x = preprocess(_images(2), 64)
    with torch.inference_mode():
        torch.testing.assert_close(enc.module(x), ref.eval()(x))


def test_open_clip_image_tower_from_a_local_file(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    config = {"embed_dim": 16,
              "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,
                             "patch_size": 16},
              "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2,
                           "layers": 1}}
    (tmp_path / "kvb-tiny-vit.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "kvb-tiny-vit.json")
    torch.manual_seed(3)
    ref = open_clip.create_model("kvb-tiny-vit").eval()
    path = tmp_path / "tiny.pt"
    torch.save(ref.state_dict(), path)
    enc = build_encoder("open_clip:kvb-tiny-vit", weights=path)
    assert (enc.dim, enc.resolution, enc.interpolation) == (16, 32, "bicubic")
    assert enc.mean == tuple(open_clip.OPENAI_DATASET_MEAN)
    images = _images(2)
    x = preprocess(images, 32, enc.mean, enc.std, "bicubic")
    with torch.inference_mode():
        expected = ref.encode_image(x)
    torch.testing.assert_close(embed_images(enc, images, progress=False), expected)


@pytest.mark.parametrize("name, message", [
    ("vit", "unknown encoder 'vit'"),
    ("timm:", "malformed encoder name 'timm:'"),
    ("timm:a:b", "malformed encoder name"),
    ("keras:resnet50", "malformed encoder name"),
    ("torchvision:resnet50", "name the weights too"),
    ("torchvision:resnet5000:IMAGENET1K_V1", "torchvision has no model 'resnet5000'"),
    ("torchvision:resnet18:IMAGENET1K_V9", "has no weights 'IMAGENET1K_V9'"),
    ("timm:no_such_net_xyz", "timm has no model 'no_such_net_xyz'"),
])
def test_bad_encoder_names_say_what_is_wrong(name, message):
    with pytest.raises(ValueError, match=message):
        build_encoder(name)


def test_missing_library_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "timm" else real(name, *a))
    with pytest.raises(ValueError, match=r"pip install 'kvb-avalanche\[timm\]'"):
        check_encoder("timm:resnet50")
    with pytest.raises(ConfigError, match=r"encoder.*kvb-avalanche\[timm\]") as e:
        ExperimentConfig(encoder="timm:resnet50")
    assert e.value.field == "encoder"


def test_download_failure_points_to_a_local_file(monkeypatch):
    import timm.models._builder as builder

    def no_network(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(builder, "load_pretrained", no_network)
    with pytest.raises(ValueError, match=r"--weights PATH"):
        build_encoder("timm:test_vit")


def test_mismatched_weights_file_names_file_and_encoder(tmp_path):
    path = tmp_path / "other.pth"
    torch.save(torch.nn.Linear(3, 2).state_dict(), path)
    with pytest.raises(ValueError, match=r"other.pth.*timm:test_vit"):
        build_encoder("timm:test_vit", weights=path)
    with pytest.raises(ValueError, match="no such file"):
        build_encoder("timm:test_vit", weights=tmp_path / "missing.pth")


def test_own_encoders_keep_their_names_and_the_cpu_input_size():
    for name in ("efficientnet_lite0", "efficientnet_lite2"):
        enc = build_encoder(name)
        assert (enc.dim, enc.resolution, enc.interpolation) == (1280, 64, "bilinear")
        emb = embed_images(enc, _images(2), progress=False)
        assert emb.shape == (2, 1280) and torch.isfinite(emb).all()
    assert build_encoder("efficientnet_lite0").weights_id != build_encoder(
        "efficientnet_lite2").weights_id


def test_device_option():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device must be"):
        resolve_device("gpu")
    with pytest.raises(ConfigError, match="device") as e:
        ExperimentConfig(device="gpu")
    assert e.value.field == "device"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda:0")


def test_cpu_embedding_path_is_unchanged_by_the_registry():
    """Our encoders' preprocessing is today's: bilinear, antialiased, ImageNet statistics."""
    enc = build_encoder("efficientnet_lite0")
    images = _images(4)
    x = torch.as_tensor(images).permute(0, 3, 1, 2).float().div_(255)
    x = torch.nn.functional.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False,
                                        antialias=True)
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.inference_mode():
        expected = enc.module(x.contiguous(memory_format=torch.channels_last))
    assert torch.equal(embed_images(enc, images, progress=False), expected)


SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_cifar = pytest.mark.skipif(not (SHARED / "cifar10").is_dir(),
                                 reason="needs CIFAR under ../shared/data")


@needs_cifar
def test_experiment_on_a_timm_backbone_records_it(vit_weights, tmp_path, cifar_cache):
    from kvb_avalanche.cli import main

    _, folder = vit_weights
    weights = folder / "test_vit.safetensors"
    out = tmp_path / "run"
    main(["split-cifar10", "--quick", "--out", str(out), "--seeds", "0", "--no-progress",
          "--cache-dir", str(cifar_cache), "--strategies", "kvb", "linear_probe",
          "--encoder", "timm:test_vit", "--weights", str(weights), "--resolution", "160",
          "--max-per-class", "20", "--test-max-per-class", "10", "--device", "cpu"])
    record = json.loads((out / "config.json").read_text())
    assert record["config"]["encoder"] == "timm:test_vit"
    assert record["config"]["device"] == "cpu" and record["device"] == "cpu"
    encoder = record["encoder"]
    assert encoder["weights"] == _sha256(weights) and encoder["dim"] == 64
    assert encoder["preprocessing"]["resolution"] == 160
    assert encoder["preprocessing"]["interpolation"] == "bicubic"
    summary = pd.read_csv(out / "summary.csv").set_index("strategy")
    assert set(summary.index) == {"kvb", "linear_probe"}
    by_hand = final_accuracy_by_hand(pd.read_csv(out / "accuracy_matrix.csv"))
    assert summary["final_accuracy"].to_dict() == pytest.approx(
        {strategy: by_hand[strategy, 0] for strategy in summary.index})
    # the embedding cache is keyed by the preprocessing: another resolution, other entries
    before = set((cifar_cache / "embeddings").glob("*.pt"))
    main(["split-cifar10", "--quick", "--out", str(tmp_path / "run2"), "--seeds", "0",
          "--no-progress", "--cache-dir", str(cifar_cache), "--strategies",
          "linear_probe", "--encoder", "timm:test_vit", "--weights", str(weights),
          "--max-per-class", "20", "--test-max-per-class", "10", "--resolution", "128"])
    assert len(set((cifar_cache / "embeddings").glob("*.pt")) - before) == 2


def test_unavailable_device_is_refused_before_any_file(tmp_path, capsys):
    from kvb_avalanche.cli import main

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(["split-cifar10", "--quick", "--out", str(out), "--device", "cuda"])
    assert e.value.code == 2 and "--device" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.skipif(os.environ.get("KVB_FULL_RUN") != "1",
                    reason="a full seed of split CIFAR-10 (25 min on 2 CPUs): KVB_FULL_RUN=1")
@needs_cifar
def test_committed_seed0_summary_is_reproduced_on_the_cpu(tmp_path):
    """The committed results/split_cifar10, seed 0, at --device cpu (every strategy)."""
    from kvb_avalanche.cli import main

    committed = Path(__file__).resolve().parents[1] / "results" / "split_cifar10"
    out = tmp_path / "seed0"
    main(["split-cifar10", "--out", str(out), "--seeds", "0", "--device", "cpu",
          "--no-progress"])
    def seed0(folder, name):
        table = pd.read_csv(folder / name).drop(columns="train_seconds", errors="ignore")
        return table[table.seed == 0].reset_index(drop=True)

    for name in ("summary.csv", "accuracy_matrix.csv"):
        pd.testing.assert_frame_equal(seed0(out, name), seed0(committed, name))


def test_embedding_cache_key_follows_backbone_weights_resolution_preprocessing(vit_weights):
    from dataclasses import replace

    from kvb_avalanche.benchmarks.embedded import embedding_meta

    _, folder = vit_weights
    cpu = torch.device("cpu")
    vit = build_encoder("timm:test_vit", weights=folder / "test_vit.pth")
    lite = build_encoder("efficientnet_lite0")

    def key(encoder, resolution=None, device=cpu):
        return json.dumps(embedding_meta(encoder, "cifar10", "train", "d", resolution
                                         or encoder.resolution, device), sort_keys=True)

    keys = {key(vit), key(lite), key(vit, 128), key(replace(vit, weights_id="other")),
            key(replace(vit, mean=(0.4, 0.4, 0.4))), key(replace(vit, interpolation="bilinear")),
            key(vit, device=torch.device("cuda"))}
    assert len(keys) == 7
    # our own encoders' keys are what they were before the registry (no preprocessing entry)
    assert set(embedding_meta(lite, "cifar10", "train", "d", 64, cpu)) == {
        "dataset", "split", "data", "encoder", "weights", "resolution"}


def test_weights_mismatch_names_the_first_key_and_its_shapes(tmp_path):
    import torchvision

    state = torchvision.models.resnet18().state_dict()
    state["conv1.weight"] = torch.zeros(32, 3, 7, 7)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"conv1.weight is \(32, 3, 7, 7\) in the file, "
                                         r"\(64, 3, 7, 7\) in the model"):
        build_encoder("torchvision:resnet18:IMAGENET1K_V1", weights=path)
    del state["conv1.weight"]
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"conv1.weight \(64, 3, 7, 7\) is missing"):
        build_encoder("torchvision:resnet18:IMAGENET1K_V1", weights=path)


def test_a_backbone_only_checkpoint_loads_without_its_classifier(tmp_path):
    """Self-supervised checkpoints (DINO, SwAV ResNet-50s) have no classifier."""
    import torchvision

    torch.manual_seed(4)
    ref = torchvision.models.resnet18()
    ref.fc = torch.nn.Identity()
    path = tmp_path / "backbone.pt"
    torch.save(ref.state_dict(), path)  # no fc.* keys
    enc = build_encoder("torchvision:resnet18:IMAGENET1K_V1", weights=path)
    x = preprocess(_images(2), 64)
    with torch.inference_mode():
        torch.testing.assert_close(enc.module(x), ref.eval()(x))


def test_unknown_library_models_get_the_closest_names():
    with pytest.raises(ValueError, match=r"did you mean timm:resnet50"):
        build_encoder("timm:resnet500")
    with pytest.raises(ValueError, match=r"did you mean torchvision:resnet50"):
        build_encoder("torchvision:resnet500:IMAGENET1K_V1")
    with pytest.raises(ValueError, match=r"did you mean .*efficientnet_lite0"):
        build_encoder("efficientnet_lite")


def test_a_resolution_the_backbone_cannot_take_is_refused_before_any_file(vit_weights,
                                                                         tmp_path, capsys):
    from kvb_avalanche.cli import main
    from kvb_avalanche.encoders import check_resolution

    _, folder = vit_weights
    vit = build_encoder("timm:test_vit", weights=folder / "test_vit.pth")
    with pytest.raises(ValueError, match="resolution 8 px does not fit encoder 'timm:test_vit'"):
        check_resolution(vit, 8)  # below one 16-px patch
    check_resolution(vit, None)  # its own size
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(["split-cifar10", "--quick", "--out", str(out), "--encoder", "timm:test_vit",
              "--weights", str(folder / "test_vit.pth"), "--resolution", "8",
              "--cache-dir", str(tmp_path / "cache")])
    assert e.value.code == 2 and "--resolution" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "cache" / "embeddings").exists()
