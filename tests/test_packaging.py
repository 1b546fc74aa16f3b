"""The package as users get it: the wheel installed outside the repository runs no code of
ours at interpreter start, fixes torchvision for itself on import, says how to fix it for
the environment, and ``doctor --fix-torchvision`` does; the dev install is fixed already."""

import ast
import os
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

from kvb_avalanche import torchvision_compat

REPO = Path(__file__).resolve().parents[1]
SITE = sysconfig.get_paths()["purelib"]  # this environment's packages (torch, avalanche, ...)
BROKEN = torchvision_compat.extension_error() is not None  # this torchvision cannot load _C


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel, and the folder it was ``pip install --target``ed into."""
    folder = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(folder), str(REPO)],
                   check=True, capture_output=True)
    (wheel,) = folder.glob("kvb_avalanche-*.whl")
    target = folder / "target"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(target), str(wheel)], check=True, capture_output=True)
    return wheel, target


def python(code: str, *path: Path | str, cwd: Path) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter that processes no .pth file (``-S``): only
    ``path`` and this environment's site-packages are importable, the repository is not."""
    prologue = f"import sys; sys.path[:0] = {[str(p) for p in (*path, SITE)]!r}\n"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-S", "-c", prologue + code], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_wheel_holds_the_package_only_and_every_module_it_imports(installed):
    """No .pth, no top-level module beside the package, every kvb_avalanche module imported
    is in the wheel, and nothing in it imports the repository's scripts or tests."""
    wheel, target = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {n.split("/")[0] for n in names} == {"kvb_avalanche", "kvb_avalanche-0.1.0.dist-info"}
    assert not [n for n in names if n.endswith(".pth")]
    assert not list(target.glob("*.pth"))
    entry_points = zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "kvb-avalanche = kvb_avalanche.cli:entry_point" in entry_points
    for name in (n for n in names if n.endswith(".py")):
        tree = ast.parse(zipfile.ZipFile(wheel).read(name))
        for node in ast.walk(tree):
            modules = ([a.name for a in node.names] if isinstance(node, ast.Import)
                       else [node.module] if isinstance(node, ast.ImportFrom) and node.module
                       else [])
            for module in modules:
                assert not module.startswith(("benchmarks", "tests")), (name, module)
                if module.startswith("kvb_avalanche"):
                    path = module.replace(".", "/")
                    assert f"{path}.py" in names or f"{path}/__init__.py" in names, (name, module)


def test_the_installed_wheel_imports_with_its_version_and_its_own_torchvision_fix(installed,
                                                                                tmp_path):
    _, target = installed
    result = python(
        "import warnings\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import kvb_avalanche, avalanche\n"
        "print(kvb_avalanche.__file__)\nprint(kvb_avalanche.__version__)\n"
        "print(any('doctor --fix-torchvision' in str(w.message) for w in caught))\n",
        target, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    where, version, warned = result.stdout.split()
    assert Path(where).is_relative_to(target)
    assert version == tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert warned == str(BROKEN)  # the message comes exactly where the fix was needed


@pytest.mark.skipif(not BROKEN, reason="torchvision's extension loads here: nothing to fix")
def test_doctor_names_the_mismatch_and_its_fix_makes_torchvision_importable_first(installed,
                                                                                  tmp_path):
    _, target = installed
    first = python("import torchvision", target, cwd=tmp_path)
    assert "operator torchvision::nms does not exist" in first.stderr  # what a user meets
    doctor = "from kvb_avalanche.cli import main; sys.exit(main(['doctor'{}]))"
    before = python(doctor.format(""), target, cwd=tmp_path)
    assert before.returncode == 1
    assert "cannot load next to torch" in before.stdout
    assert "kvb-avalanche doctor --fix-torchvision" in before.stdout
    assert torchvision_compat.PTH_NAME in before.stdout  # it says what the fix writes
    site = tmp_path / "site"
    site.mkdir()
    fixed = python(doctor.format(f", '--fix-torchvision', '--site-packages', {str(site)!r}"),
                   target, cwd=tmp_path)
    assert fixed.returncode == 0, fixed.stderr
    (pth,) = site.glob("*.pth")
    assert pth.name == torchvision_compat.PTH_NAME and str(target) in pth.read_text()
    after = python("import site; site.addsitedir(sys.argv[1] if len(sys.argv) > 1 else "
                   f"{str(site)!r})\nimport torchvision, avalanche\n"
                   "print('kvb_avalanche' in sys.modules)", target, cwd=tmp_path)
    assert after.returncode == 0, after.stderr
    assert after.stdout.split() == ["False"]  # the package itself was never imported


@pytest.mark.skipif(not BROKEN, reason="torchvision's extension loads here: nothing was fixed")
def test_the_dev_install_imports_avalanche_without_importing_the_package(tmp_path):
    """`scripts/install.sh` applied the fix inside .venv, where this torchvision needs it."""
    result = subprocess.run([sys.executable, "-c", "import avalanche, sys; "
                             "print('kvb_avalanche' in sys.modules)"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False"]


def test_the_private_avalanche_names_exist_and_a_missing_one_is_named():
    from kvb_avalanche import avalanche_api

    dataset = avalanche_api.tensor_classification_dataset(
        __import__("torch").zeros(3, 2), [0, 1, 1], targets=[0, 1, 1], task_labels=[0, 0, 0])
    assert len(dataset) == 3 and sorted(dataset.targets.uniques) == [0, 1]
    with pytest.raises(AttributeError, match=r"SupervisedTemplate._criterion .* avalanche-lib "
                                             r"0\.6\.\*, which the installed avalanche-lib "):
        avalanche_api.criterion_of(object())
    assert avalanche_api.as_experiences(x := object()) == [x]
