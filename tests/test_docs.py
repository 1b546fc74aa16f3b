"""Every code block of README.md and docs/*.md runs, in order, one namespace per document
(sybil): Python blocks in this interpreter, bash blocks in a shell whose ``PATH`` starts
with this environment's ``bin`` (so ``kvb-avalanche`` is this checkout's); YAML blocks are
sweep files, parsed and validated; TOML blocks are parsed. Both run in a
scratch copy of the repository's layout, so what they write lands there. A block that
cannot run here (a full experiment, a cluster, a package install) is marked in the
document with ``<!-- skip: next "why" -->``; a skip without its reason fails."""

import os
import shutil
import subprocess
import sys
import unittest
from pathlib import Path

import pytest
from sybil import Sybil
from sybil.parsers.markdown import CodeBlockParser, PythonCodeBlockParser, SkipParser

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = ["README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))]


def run_bash(example) -> None:
    """Run a bash block with ``set -euo pipefail``; its failure shows its output."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", example.parsed],
                            cwd=example.namespace["workdir"], env=env, capture_output=True,
                            text=True, timeout=600)
    if result.returncode:
        raise AssertionError(f"{example.path}:{example.line}: exit {result.returncode}\n"
                             f"{example.parsed}\n{result.stdout[-3000:]}{result.stderr[-3000:]}")


def check_sweep_file(example) -> None:
    """A YAML block is a sweep file: it must parse into a sweep, every point a valid config."""
    import yaml

    from kvb_avalanche.experiments.config import ConfigError
    from kvb_avalanche.experiments.spec import parse_spec

    try:
        spec = parse_spec(yaml.safe_load(example.parsed), where=f"{example.path}:{example.line}")
        assert spec.points(), "a sweep without a grid point"
    except ConfigError as e:
        raise AssertionError(f"{example.path}:{example.line}: {e}") from e


def check_toml(example) -> None:
    import tomllib

    tomllib.loads(example.parsed)


SYBIL = Sybil(parsers=[PythonCodeBlockParser(), CodeBlockParser("bash", run_bash),
                       CodeBlockParser("yaml", check_sweep_file),
                       CodeBlockParser("toml", check_toml), SkipParser()],
              path=str(REPO))


@pytest.fixture
def workdir(tmp_path, monkeypatch, cifar_cache):
    """A scratch repository: the checkout's files linked (results/ copied, since `report`
    writes into it), ``../shared`` beside it as beside the checkout, and the cwd."""
    work = tmp_path / "repo"
    work.mkdir()
    for item in REPO.iterdir():
        if item.name in {".git", ".venv", "out"}:
            continue
        if item.name == "results":
            shutil.copytree(item, work / item.name)
        else:
            (work / item.name).symlink_to(item)
    if (REPO.parent / "shared").exists():
        (tmp_path / "shared").symlink_to(REPO.parent / "shared")
    monkeypatch.chdir(work)
    monkeypatch.setenv("KVB_CACHE_DIR", str(cifar_cache))
    return work


LANGUAGES = {"python", "bash", "yaml", "toml"}  # what runs; an untagged block is a figure


def fences(text: str) -> list[str]:
    """The language tag of every fenced block in a Markdown text ('' if untagged)."""
    tags, inside = [], False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("```"):
            if not inside:
                tags.append(stripped[3:].strip())
            inside = not inside
    return tags


def evaluate(path: Path, workdir: Path) -> tuple[int, list[str]]:
    """Run a document's blocks in order: (blocks run, 'line: reason' of those skipped).
    Every tagged block must be one sybil ran or skipped: none is dropped unseen."""
    tags = fences(Path(path).read_text())
    unknown = sorted(set(tags) - LANGUAGES - {""})
    assert not unknown, f"{path}: blocks in {unknown}, which tests/test_docs.py cannot run"
    document = SYBIL.parse(path)
    document.namespace["workdir"] = workdir
    ran, skipped = 0, []
    for example in document:
        if isinstance(example.parsed, tuple):  # a skip directive: (action, reason)
            if example.parsed[0] in ("next", "start") and not example.parsed[1]:
                raise AssertionError(f"{path}:{example.line}: a skip needs its reason")
            example.evaluate()
            continue
        try:
            example.evaluate()
        except unittest.SkipTest as e:
            skipped.append(f"{example.line}: {e}")
            continue
        ran += 1
    assert ran + len(skipped) == sum(map(bool, tags)), f"{path}: a tagged block was not seen"
    return ran, skipped


@pytest.mark.parametrize("name", DOCUMENTS)
def test_every_code_block_runs(name, workdir):
    ran, skipped = evaluate(REPO / name, workdir)
    print(f"{name}: {ran} blocks ran;", "; ".join(skipped) or "none skipped")  # noqa: T201


@pytest.mark.parametrize("block, message", [
    ("```python\nassert 1 == 2, 'wrong'\n```\n", "wrong"),
    ("```bash\nfalse\n```\n", "exit 1"),
    ("```yaml\nparameters: {codebooks: {values: [0]}}\n```\n", "codebooks"),
    ("<!-- skip: next -->\n```python\nx = 1\n```\n", "a skip needs its reason"),
    ("```sh\nfalse\n```\n", r"blocks in \['sh'\]"),
])
def test_a_failing_or_unexplained_block_fails(tmp_path, block, message):
    (tmp_path / "doc.md").write_text("Intro.\n\n" + block)
    with pytest.raises(AssertionError, match=message):
        evaluate(tmp_path / "doc.md", tmp_path)


def test_a_skip_with_its_reason_leaves_the_block_out(tmp_path):
    (tmp_path / "doc.md").write_text('<!-- skip: next "too slow" -->\n```bash\nfalse\n```\n'
                                     "\n```bash\ntouch ran\n```\n")
    assert evaluate(tmp_path / "doc.md", tmp_path) == (1, ["2: too slow"])
    assert (tmp_path / "ran").exists()
