"""A user's benchmark, registered from a module of its own (as ``--import MODULE`` does):
a class-per-folder tree of images of any size, split class-incrementally."""

from kvb_avalanche.benchmarks.imagefolder import ImageFolderBenchmark
from kvb_avalanche.benchmarks.registry import BENCHMARKS, register_benchmark

if "split_shapes" not in BENCHMARKS:  # (pytest may import this module twice)
    @register_benchmark
    class SplitShapes(ImageFolderBenchmark):
        """Four classes of synthetic shapes in two experiences, read from --data-root."""

        name = "split_shapes"
        num_classes = 4
        n_experiences = 2
        description = "synthetic shapes of mixed sizes and modes (a test's)"
