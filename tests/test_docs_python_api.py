"""docs/python-api.md runs as written: every ```python block, in order, in one namespace,
from a scratch directory that has the repository's configs/ (as the page's root)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("restore_logging")

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "python-api.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", text, flags=re.S | re.M)


def test_python_api_page_runs(tmp_path, monkeypatch):
    blocks = python_blocks(PAGE.read_text())
    assert len(blocks) >= 6
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    has_checkpoint = importlib.util.find_spec("fedsim.checkpoint") is not None
    namespace: dict = {}
    for number, block in enumerate(blocks, 1):
        if ".model" in block and not has_checkpoint:
            pytest.skip(f"blocks 1-{number - 1} ran; block {number} needs fedsim.checkpoint, not there yet")
        exec(compile(block, f"{PAGE.name}, python block {number}", "exec"), namespace)


def test_readme_shows_what_make_demo_prints(cli, tmp_path):
    """The README quotes the last lines `make demo` prints (`fedsim run configs/quickstart.toml`):
    the numbers must be the ones a fresh run gives (they went stale once, when the default
    engine changed). The README quotes the CPU's numbers: on a GPU machine `make demo` trains
    there, and float32 sums in another order end elsewhere after 20 rounds."""
    quoted = re.search(r"^(accuracy: final .*)$", (ROOT / "README.md").read_text(), re.M).group(1)
    code, out, err = cli("run", ROOT / "configs" / "quickstart.toml", "--no-progress",
                         "--set", f"output.dir={tmp_path / 'demo'}", "--device", "cpu")
    assert code == 0, err
    assert quoted in out.splitlines(), (quoted, out)
