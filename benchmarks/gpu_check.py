"""GPU check: embed CIFAR-10 on the GPU, train every strategy there, and compare with the CPU.

    python benchmarks/gpu_check.py --data-root ../shared/data --out out/gpu_check

Checks, on a machine with CUDA, what CPU-only CI cannot:

- embedding: the batch size chosen for the GPU's memory and float16 autocast (embeddings of
  the same images against float32 ones on the CPU: minimum cosine, maximum relative error);
- key fitting and training on the GPU (KVB takes autograd with sparse gradients there, the
  fused numba step on the CPU): the same experiment runs on both devices, from the same
  images and seed, and each strategy's final accuracy on the GPU must be within
  ``--tolerance`` of the CPU's;
- throughput: images embedded per second and each experiment's wall time on both devices.

Writes ``gpu_check.json`` (the numbers and the verdict) and each device's experiment
(the usual tables) under ``--out``. Exit status 0 when every check passes, 1 otherwise.

Encoder: ``--encoder`` (default a torchvision ResNet-50 at 224 px, the paper's backbone).
Weights: ``--weights`` (a local file), else the library's download; ``--random-weights``
uses the untrained network on a machine with neither (the accuracies then mean little,
but both devices see the same network, so the comparison and the speed still hold).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from kvb_avalanche.benchmarks.cifar import load_cifar
from kvb_avalanche.device import resolve_device
from kvb_avalanche.encoders import build_encoder, embed_images
from kvb_avalanche.experiments import ExperimentConfig, RunOptions, run_experiment

log = logging.getLogger("gpu_check")
RESNET50 = "torchvision:resnet50:IMAGENET1K_V2"
STRATEGIES = ("kvb", "kvb_joint", "linear_probe", "naive", "slda")


def _random_weights(encoder: str) -> Path:
    """An untrained torchvision network's state dict, saved to a temporary file."""
    import torchvision

    if not encoder.startswith("torchvision:"):
        raise SystemExit(f"--random-weights takes a torchvision:MODEL:WEIGHTS encoder, "
                         f"got --encoder {encoder!r}")
    path = Path(tempfile.mkdtemp()) / "random.pt"
    torch.save(torchvision.models.get_model(encoder.split(":")[1], weights=None).state_dict(),
               path)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--data-root", type=Path, default=None)
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--device", default="cuda", help="cuda, cuda:N (cpu: a dry run)")
    p.add_argument("--encoder", default=RESNET50, help=f"a backbone name (default {RESNET50})")
    p.add_argument("--resolution", type=int, default=None, help="default: the encoder's own")
    p.add_argument("--weights", type=Path, default=None)
    p.add_argument("--random-weights", action="store_true")
    p.add_argument("--max-per-class", type=int, default=1000, help="train images per class")
    p.add_argument("--key-init-data", default="cifar100", choices=("cifar100", "cifar10", "none"))
    p.add_argument("--codebooks", type=int, default=256)
    p.add_argument("--num-pairs", type=int, default=4096)
    p.add_argument("--compare", type=int, default=256, help="images embedded on both devices")
    p.add_argument("--tolerance", type=float, default=0.02,
                   help="largest accepted gap in final accuracy between the devices")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        p.error(str(e))
    if args.weights is None and args.random_weights:
        args.weights = _random_weights(args.encoder)
        log.warning("untrained %s: accuracies mean little, the device comparison does not",
                    args.encoder)
    encoder = build_encoder(args.encoder, args.weights)
    resolution = args.resolution or encoder.resolution

    # float16 autocast on the device against float32 on the CPU, same images
    images = load_cifar("cifar10", "test", root=args.data_root, max_per_class=args.compare // 10,
                        progress=False).images
    # warm-up at the timed shapes: the first GPU batch of a shape pays the backend's start-up
    embed_images(encoder, images, resolution, device=device, progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    on_device = embed_images(encoder, images, resolution, device=device, progress=False)
    device_seconds = time.perf_counter() - start
    start = time.perf_counter()
    on_cpu = embed_images(encoder, images, resolution, device="cpu", batch_size=64,
                          progress=False)
    cpu_seconds = time.perf_counter() - start
    cosine = torch.nn.functional.cosine_similarity(on_device, on_cpu).min().item()
    rel = ((on_device - on_cpu).norm(dim=1) / on_cpu.norm(dim=1)).max().item()

    config = ExperimentConfig(encoder=args.encoder, weights=args.weights, resolution=resolution,
                              device=args.device, seeds=(0,), max_per_class=args.max_per_class,
                              test_max_per_class=max(1, args.max_per_class // 5),
                              key_init_data=args.key_init_data, key_init_max_per_class=100,
                              codebooks=args.codebooks, num_pairs=args.num_pairs,
                              strategies=STRATEGIES)
    options = RunOptions(data_root=args.data_root, cache_dir=args.cache_dir, progress=False)
    tables, seconds = {}, {}
    for name, cfg in (("device", config), ("cpu", replace(config, device="cpu"))):
        start = time.perf_counter()
        tables[name] = run_experiment(cfg, args.out / name, options)
        seconds[name] = time.perf_counter() - start
    accuracy = {name: table.set_index("strategy")["final_accuracy_mean"].to_dict()
                for name, table in tables.items()}
    gaps = {s: abs(accuracy["device"][s] - accuracy["cpu"][s]) for s in accuracy["device"]}
    checks = {
        "autocast_embeddings_min_cosine_above_0.99": cosine > 0.99,
        f"final_accuracy_gaps_within_{args.tolerance}": max(gaps.values()) <= args.tolerance,
    }
    report = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "encoder": args.encoder, "weights": encoder.weights_id, "resolution": resolution,
        "compare_images": len(images),
        "embedding_images_per_second": {"device": len(images) / device_seconds,
                                        "cpu": len(images) / cpu_seconds},
        "min_cosine_device_vs_cpu_float32": cosine,
        "max_relative_difference_device_vs_cpu": rel,
        "experiment_seconds": seconds,
        "final_accuracy": accuracy,
        "final_accuracy_gap": gaps,
        "checks": checks,
        "passed": all(checks.values()),
    }
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    log.info("%s", json.dumps(report, indent=2, default=str))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
