"""benchmarks/cifar.py: loading CIFAR from each accepted layout, on small fixtures made here."""

from __future__ import annotations

import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kvb_avalanche.benchmarks.cifar import DataError, ImageSplit, default_data_roots, load_cifar

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CLASSES = ["airplane", "automobile", "bird"]
PER_CLASS = 4


def make_images(per_class: int = PER_CLASS, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random (n, 32, 32, 3) uint8 images and labels 0,0,..,1,1,..,2,2 (grouped by class)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (len(CLASSES) * per_class, 32, 32, 3), dtype=np.uint8)
    return images, np.repeat(np.arange(len(CLASSES)), per_class)


def write_tree(root: Path, images: np.ndarray, labels: np.ndarray, name: str = "cifar10",
               split: str = "train") -> list[Path]:
    """An ImageFolder tree root/name/split/<class>/img_XXX.png; files sort in array order."""
    files = []
    for i, (img, y) in enumerate(zip(images, labels, strict=True)):
        folder = root / name / split / CLASSES[y]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"img_{i:03d}.png")
        files.append(folder / f"img_{i:03d}.png")
    return files


def write_pickles(root: Path, images: np.ndarray, labels: np.ndarray,
                  str_keys: bool = False) -> None:
    """A torchvision ``cifar-10-batches-py`` folder: train over 5 batches, test = first 2."""
    folder = root / "cifar-10-batches-py"
    write_pickle_folder(folder, images, labels, str_keys)


def write_pickle_folder(folder: Path, images: np.ndarray, labels: np.ndarray,
                        str_keys: bool = False) -> None:
    folder.mkdir(parents=True)
    key = str if str_keys else str.encode  # the 2009 release's py2 pickles read as str keys
    rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # R plane, G plane, B plane

    def dump(file: str, entry: dict) -> None:
        with open(folder / file, "wb") as f:
            pickle.dump({key(k): v for k, v in entry.items()}, f)

    for i, part in enumerate(np.array_split(np.arange(len(images)), 5), start=1):
        dump(f"data_batch_{i}", {"data": rows[part], "labels": labels[part].tolist(),
                                 "batch_label": f"training batch {i} of 5"})
    dump("test_batch", {"data": rows[:2], "labels": labels[:2].tolist()})
    dump("batches.meta", {"label_names": [c.encode() for c in CLASSES], "num_vis": 3072})


def write_archives(root: Path, tree: Path, parts: list[list[Path]], suffix: str = ".tar.gz",
                   name: str = "cifar10") -> None:
    """tar archives root/name/partK<suffix> holding the given files of ``tree``, as name/..."""
    (root / name).mkdir(parents=True, exist_ok=True)
    mode = "w:gz" if suffix in (".tar.gz", ".tgz") else "w"
    for k, files in enumerate(parts, start=1):
        with tarfile.open(root / name / f"part{k}{suffix}", mode) as tar:
            for f in files:
                tar.add(f, arcname=f.relative_to(tree).as_posix())


def check(got: ImageSplit, images: np.ndarray, labels: np.ndarray) -> None:
    assert got.images.shape == images.shape and got.images.dtype == np.uint8
    assert got.labels.shape == labels.shape and got.labels.dtype == np.int64
    np.testing.assert_array_equal(got.images, images)
    np.testing.assert_array_equal(got.labels, labels)
    assert len(got.identity) == 64


# ---------------------------------------------------------------------------- layouts
def test_imagefolder_tree_gives_exact_pixels_labels_and_classes(tmp_path):
    images, labels = make_images()
    write_tree(tmp_path, images, labels)
    (tmp_path / "cifar10" / "train" / "bird" / "notes.txt").write_text("not an image")
    (tmp_path / "cifar10" / "train" / "bird" / "._img_999.png").write_bytes(b"resource fork")
    got = load_cifar("cifar10", "train", root=tmp_path, progress=False)
    check(got, images, labels)
    assert got.classes == CLASSES
    assert "ImageFolder" in got.source and str(tmp_path) in got.source
    again = load_cifar("cifar10", "train", root=tmp_path)  # with a progress bar this time
    assert again.identity == got.identity


def test_tar_archives_in_two_parts_equal_the_tree(tmp_path):
    images, labels = make_images()
    tree = tmp_path / "tree"
    files = write_tree(tree, images, labels)
    files += write_tree(tree, images[:3], labels[:3], split="test")  # another split: ignored
    # part 1: the first half of each class, part 2 the rest (as the shared CIFAR-100 parts)
    first = [f for f in files if int(f.stem[-3:]) % PER_CLASS < PER_CLASS // 2]
    rest = [f for f in files if f not in first]
    write_archives(tmp_path / "archives", tree, [rest, first])
    from_tree = load_cifar("cifar10", "train", root=tree, progress=False)
    from_tar = load_cifar("cifar10", "train", root=tmp_path / "archives", progress=False)
    check(from_tar, images, labels)
    assert from_tar.classes == CLASSES
    assert from_tar.identity == from_tree.identity
    assert "tar archives: part1.tar.gz, part2.tar.gz" in from_tar.source


def test_a_plain_tar_archive_is_read_too(tmp_path):
    images, labels = make_images(2)
    tree = tmp_path / "tree"
    files = write_tree(tree, images, labels)
    write_archives(tmp_path / "archives", tree, [files], suffix=".tar")
    check(load_cifar("cifar10", "train", root=tmp_path / "archives", progress=False),
          images, labels)


def test_archives_without_the_split_say_what_they_hold(tmp_path):
    images, labels = make_images(2)
    tree = tmp_path / "tree"
    write_archives(tmp_path / "archives", tree, [write_tree(tree, images, labels)])
    with pytest.raises(DataError, match=r"hold no cifar10/test/ images \(they hold: cifar10/train"):
        load_cifar("cifar10", "test", root=tmp_path / "archives", progress=False)


@pytest.mark.parametrize("str_keys", [False, True], ids=["bytes_keys", "str_keys"])
def test_torchvision_pickle_folder(tmp_path, str_keys):
    images, labels = make_images()
    write_pickles(tmp_path, images, labels, str_keys=str_keys)
    got = load_cifar("cifar10", "train", root=tmp_path, progress=False)
    check(got, images, labels)
    assert got.classes == CLASSES and "cifar-10-batches-py" in got.source
    check(load_cifar("cifar10", "test", root=tmp_path, progress=False), images[:2], labels[:2])


def test_avalanches_download_layout_is_found_in_its_default_location(tmp_path, monkeypatch):
    """Avalanche's SplitCIFAR10 downloads into <dataset_location>/cifar10/cifar-10-batches-py
    (~/.avalanche/data by default): found with no root given, or given either folder."""
    from avalanche.benchmarks.datasets.dataset_utils import AVALANCHE_CONFIG

    images, labels = make_images()
    location = tmp_path / "avalanche-data"
    write_pickle_folder(location / "cifar10" / "cifar-10-batches-py", images, labels)
    monkeypatch.setitem(AVALANCHE_CONFIG, "dataset_location", str(location))
    monkeypatch.delenv("KVB_DATA_ROOT", raising=False)
    got = load_cifar("cifar10", "train", progress=False)
    check(got, images, labels)
    assert "cifar10/cifar-10-batches-py" in got.source
    for root in (location, location / "cifar10"):  # Avalanche's own dataset_root works too
        check(load_cifar("cifar10", "train", root=root, progress=False), images, labels)


def test_pickle_rows_are_channel_planes(tmp_path):
    """A row of the pickle is R plane, G plane, B plane: pixel (y, x) = (R, G, B)[y * 32 + x]."""
    rows = np.concatenate([np.full(1024, 10), np.arange(1024) % 256, np.full(1024, 30)])
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for file in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / file, "wb") as f:
            pickle.dump({b"data": rows[None].astype(np.uint8), b"labels": [1]}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in CLASSES]}, f)
    got = load_cifar("cifar10", "test", root=tmp_path, progress=False)
    assert got.images.shape == (1, 32, 32, 3)
    np.testing.assert_array_equal(got.images[0, 0, 5], [10, 5, 30])
    np.testing.assert_array_equal(got.images[0, 1, 0], [10, 32, 30])
    np.testing.assert_array_equal(got.labels, [1])


def test_cifar100_pickle_folder_uses_fine_labels(tmp_path):
    images, labels = make_images(2)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    for split in ("train", "test"):
        with open(folder / split, "wb") as f:
            pickle.dump({b"data": rows, b"fine_labels": labels.tolist(),
                         b"coarse_labels": [0] * len(labels)}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [c.encode() for c in CLASSES],
                     b"coarse_label_names": [b"vehicles"]}, f)
    got = load_cifar("cifar100", "test", root=tmp_path, progress=False)
    check(got, images, labels)
    assert got.classes == CLASSES


def test_the_same_pixels_from_any_layout_have_the_same_identity(tmp_path):
    images, labels = make_images()
    write_pickles(tmp_path / "pickles", images, labels)
    write_tree(tmp_path / "tree", images, labels)
    from_pickles = load_cifar("cifar10", "train", root=tmp_path / "pickles", progress=False)
    from_tree = load_cifar("cifar10", "train", root=tmp_path / "tree", progress=False)
    assert from_pickles.identity == from_tree.identity
    # and it changes with the data: a pixel, or a label
    changed = images.copy()
    changed[5, 7, 7, 1] ^= 1
    write_tree(tmp_path / "tree2", changed, labels)
    assert load_cifar("cifar10", "train", root=tmp_path / "tree2",
                      progress=False).identity != from_tree.identity
    relabelled = labels.copy()
    relabelled[-1] = 0  # same pixels in the same order
    write_pickles(tmp_path / "pickles2", images, relabelled)
    assert load_cifar("cifar10", "train", root=tmp_path / "pickles2",
                      progress=False).identity != from_tree.identity


def test_layouts_are_tried_in_order(tmp_path):
    images, labels = make_images(2)
    other, _ = make_images(2, seed=1)
    write_pickles(tmp_path, images, labels)
    write_tree(tmp_path, other, labels)
    np.testing.assert_array_equal(
        load_cifar("cifar10", "train", root=tmp_path, progress=False).images, images)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()  # incomplete: next layout
    np.testing.assert_array_equal(
        load_cifar("cifar10", "train", root=tmp_path, progress=False).images, other)


# ---------------------------------------------------------------------------- options
@pytest.mark.parametrize("layout", ["tree", "archives", "pickles"])
def test_max_per_class_keeps_the_first_images_of_each_class(tmp_path, layout):
    images, labels = make_images()
    if layout == "pickles":
        write_pickles(tmp_path, images, labels)
    else:
        files = write_tree(tmp_path / "tree", images, labels)
        if layout == "archives":
            write_archives(tmp_path, tmp_path / "tree", [files[1::2], files[::2]])
        else:
            tmp_path = tmp_path / "tree"
    got = load_cifar("cifar10", "train", root=tmp_path, max_per_class=2, progress=False)
    check(got, images[[0, 1, 4, 5, 8, 9]], np.array([0, 0, 1, 1, 2, 2]))
    full = load_cifar("cifar10", "train", root=tmp_path, max_per_class=99, progress=False)
    check(full, images, labels)


def test_default_roots_are_the_environment_then_avalanches_data_folder(tmp_path, monkeypatch):
    from avalanche.benchmarks.datasets.dataset_utils import AVALANCHE_CONFIG

    env_root, avalanche_root = tmp_path / "env", tmp_path / "avalanche-data"
    env_root.mkdir()
    monkeypatch.setitem(AVALANCHE_CONFIG, "dataset_location", str(avalanche_root))
    monkeypatch.setenv("KVB_DATA_ROOT", str(env_root))
    assert default_data_roots() == [env_root.resolve(), avalanche_root.resolve()]
    monkeypatch.delenv("KVB_DATA_ROOT")
    assert default_data_roots() == [avalanche_root.resolve()]
    # the library never looks in the working directory or beside the repository
    monkeypatch.chdir(tmp_path)
    write_tree(tmp_path / "data", *make_images(2), split="test")
    with pytest.raises(DataError, match="no copy of cifar10 test found in"):
        load_cifar("cifar10", "test", progress=False)


# ---------------------------------------------------------------------------- errors
def test_missing_copy_explains_the_layouts_and_the_download(tmp_path):
    with pytest.raises(DataError) as err:
        load_cifar("cifar10", "test", root=tmp_path, progress=False)
    msg = str(err.value)
    assert msg.startswith(f"no copy of cifar10 test found in {tmp_path}")
    for needle in ("cifar-10-batches-py", "ImageFolder", "cifar10/test/<class>/", "*.tar.gz",
                   "kvb-avalanche split-cifar10 --download", "torchvision.datasets.CIFAR10(root, "
                   "download=True)"):
        assert needle in msg
    assert isinstance(err.value, ValueError)


def test_a_root_that_is_not_a_folder_is_reported(tmp_path):
    with pytest.raises(DataError, match="is not a folder"):
        load_cifar("cifar100", "train", root=tmp_path / "nowhere", progress=False)


def test_a_broken_image_names_its_file(tmp_path):
    images, labels = make_images(1)
    write_tree(tmp_path, images, labels)
    (tmp_path / "cifar10" / "train" / "bird" / "img_002.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"cannot decode image .*bird.img_002\.png"):
        load_cifar("cifar10", "train", root=tmp_path, progress=False)


def test_an_image_of_the_wrong_size_is_refused(tmp_path):
    folder = tmp_path / "cifar10" / "train" / "bird"
    folder.mkdir(parents=True)
    Image.new("RGB", (64, 32)).save(folder / "big.png")
    with pytest.raises(DataError, match="is 64x32, expected 32x32"):
        load_cifar("cifar10", "train", root=tmp_path, progress=False)


@pytest.mark.parametrize("kwargs, match", [
    ({"name": "mnist", "split": "train"}, r"unknown data set 'mnist' \(argument 'name'\)"),
    ({"name": "cifar10", "split": "val"}, r"split must be one of train, test \(argument 'split'"),
    ({"name": "cifar10", "split": "train", "max_per_class": 0}, "max_per_class must be"),
])
def test_bad_arguments_are_refused(tmp_path, kwargs, match):
    with pytest.raises(DataError, match=match):
        load_cifar(root=tmp_path, **kwargs)


# ---------------------------------------------------------------------------- real data
@pytest.mark.skipif(not (SHARED / "cifar10").is_dir(), reason="../shared/data not present")
def test_shared_archives_load():
    got = load_cifar("cifar10", "test", root=SHARED, max_per_class=5, progress=False)
    assert got.images.shape == (50, 32, 32, 3) and got.images.dtype == np.uint8
    assert got.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                           "horse", "ship", "truck"]
    np.testing.assert_array_equal(got.labels, np.repeat(np.arange(10), 5))
    assert "cifar10_test.tar.gz" in got.source
