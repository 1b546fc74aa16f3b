"""Your own images: a class-per-folder tree at any resolution, split class-incrementally.

Declare the benchmark in one file of your own and import it (``--import MODULE``)::

    from kvb_avalanche.benchmarks.imagefolder import ImageFolderBenchmark
    from kvb_avalanche.benchmarks.registry import register_benchmark

    @register_benchmark
    class SplitFlowers(ImageFolderBenchmark):
        name = "split_flowers"
        root = "~/data/flowers"  # holds train/<class>/<image> and test/<class>/<image>
        num_classes = 6
        n_experiences = 3

Images of any size and mode (PNG, JPEG, WebP; grey, RGB, RGBA) are read, converted to RGB
and resized (whole, antialiased bilinear) to the encoder's input resolution as they are
decoded, so a tree of large photos never sits in memory at full size. Labels index the
sorted class folders; the class order is drawn from each seed (``shuffle_classes``).
``--data-root DIR`` reads ``DIR/<name>/`` instead of ``root``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from kvb_avalanche.benchmarks.cifar import DataError, ImageSplit, load_image_tree
from kvb_avalanche.benchmarks.registry import Benchmark, Dataset


class ImageFolderBenchmark(Benchmark):
    """A class-incremental benchmark over ``root/{train,test}/<class>/<image>``; keys are
    fitted on the first experience unless ``key_init_data`` names a data set."""

    root: ClassVar[str | None] = None
    dataset: ClassVar[str] = ""  # its own data set, named after the benchmark
    defaults: ClassVar[dict[str, Any]] = {"shuffle_classes": True}

    @classmethod
    def data_set(cls) -> Dataset:
        cls.dataset = cls.name
        where = (f"{cls.root or '--data-root DIR'}"
                 f"{'' if cls.root else '/' + cls.name}/{{train,test}}/<class>/<image>")

        def load(split: str, *, max_per_class: int | None, size: int | None,
                 options: Any) -> ImageSplit:
            root = getattr(options, "root", None)
            base = Path(root).expanduser() / cls.name if root is not None else cls.root
            if base is None:
                raise DataError(f"benchmark {cls.name!r} reads a class-per-folder tree: give "
                                f"--data-root DIR holding {cls.name}/train/<class>/<image> "
                                f"and {cls.name}/test/<class>/<image>, or declare its root")
            if size is None:
                raise DataError(f"benchmark {cls.name!r}: images of any size need a size to "
                                "be read at (the encoder's resolution)")
            got = load_image_tree(Path(base).expanduser() / split, size=size,
                                  max_per_class=max_per_class,
                                  progress=getattr(options, "progress", True))
            if len(got.classes) != cls.num_classes:
                raise DataError(f"benchmark {cls.name!r} declares {cls.num_classes} classes; "
                                f"{got.source} has {len(got.classes)}: {', '.join(got.classes)}")
            return got

        return Dataset(cls.name, cls.num_classes, None, load, where)
