"""GPU check: embed CIFAR-10 with a ResNet-50 at 224 px on the GPU, and train KVB there.

    python benchmarks/gpu_check.py --data-root ../shared/data --out out/gpu_check

Checks, on a machine with CUDA, what CPU-only CI cannot: the batch size chosen for the
GPU's memory, float16 autocast (embeddings against float32 ones of the same images on the
CPU), key fitting and KVB training on the GPU, and the throughput. Writes ``gpu_check.json``
and the experiment's usual tables to ``--out``.

Weights: ``--weights`` (a local ResNet-50 state dict), else torchvision's ``IMAGENET1K_V2``
download; ``--random-weights`` uses an untrained ResNet-50 on a machine with neither (the
accuracies are then meaningless; the device path and the speed are still checked).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

from kvb_avalanche.benchmarks.cifar import load_cifar
from kvb_avalanche.device import resolve_device
from kvb_avalanche.encoders import build_encoder, embed_images
from kvb_avalanche.experiments import ExperimentConfig, RunOptions, run_experiment

log = logging.getLogger("gpu_check")
ENCODER = "torchvision:resnet50:IMAGENET1K_V2"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--data-root", type=Path, default=None)
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--device", default="cuda", help="cuda, cuda:N (cpu: a dry run)")
    p.add_argument("--weights", type=Path, default=None)
    p.add_argument("--random-weights", action="store_true")
    p.add_argument("--max-per-class", type=int, default=1000, help="train images per class")
    p.add_argument("--compare", type=int, default=256, help="images embedded on both devices")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        p.error(str(e))
    if args.weights is None and args.random_weights:
        import torchvision

        args.weights = Path(tempfile.mkdtemp()) / "resnet50_random.pt"
        torch.save(torchvision.models.resnet50().state_dict(), args.weights)
        log.warning("untrained ResNet-50: accuracies are meaningless, device and speed are not")
    encoder = build_encoder(ENCODER, args.weights)

    # float16 autocast on the device against float32 on the CPU, same images
    images = load_cifar("cifar10", "test", root=args.data_root, max_per_class=args.compare // 10,
                        progress=False).images
    start = time.perf_counter()
    on_device = embed_images(encoder, images, device=device, progress=False)
    device_seconds = time.perf_counter() - start
    on_cpu = embed_images(encoder, images, device="cpu", batch_size=64, progress=False)
    cosine = torch.nn.functional.cosine_similarity(on_device, on_cpu).min().item()
    rel = ((on_device - on_cpu).norm(dim=1) / on_cpu.norm(dim=1)).max().item()

    config = ExperimentConfig(encoder=ENCODER, weights=args.weights, resolution=224,
                              device=args.device, seeds=(0,), max_per_class=args.max_per_class,
                              test_max_per_class=args.max_per_class // 5,
                              key_init_data="cifar100", key_init_max_per_class=100,
                              strategies=("kvb", "linear_probe", "slda"))
    start = time.perf_counter()
    table = run_experiment(config, args.out, RunOptions(data_root=args.data_root,
                                                        cache_dir=args.cache_dir))
    report = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "encoder": ENCODER, "weights": encoder.weights_id, "resolution": 224,
        "compare_images": len(images),
        "embedding_images_per_second_on_device": len(images) / device_seconds,
        "min_cosine_device_vs_cpu_float32": cosine,
        "max_relative_difference_device_vs_cpu": rel,
        "experiment_seconds": time.perf_counter() - start,
        "summary": table.reset_index().to_dict(orient="records"),
    }
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    log.info("%s", json.dumps(report, indent=2, default=str))
    return 0 if cosine > 0.99 else 1


if __name__ == "__main__":
    sys.exit(main())
