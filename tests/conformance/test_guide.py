"""docs/architecture.md's worked example (FedDyn) is the code in the repository: every file
its table names exists, and every line of its code blocks is a line of the file it shows."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GUIDE = (REPO / "docs/architecture.md").read_text()
SECTION = GUIDE[GUIDE.index("## Add an algorithm"):GUIDE.index("## Register from your own package")]


def test_the_file_table_names_real_files():
    files = re.findall(r"^\| `([^`]+)` \|", SECTION, flags=re.M)
    assert len(files) >= 7 and "fedsim/registry.py" in files
    assert [f for f in files if not (REPO / f).is_file()] == []


def test_every_code_line_of_the_example_is_in_the_file_it_shows():
    for heading, path in re.findall(r"^### \d\. (.*?`([^`]+\.py)`)$", SECTION, flags=re.M):
        block = SECTION[SECTION.index(heading):]
        code = block[block.index("```python") + len("```python"):]
        code = code[:code.index("```")]
        lines = set((REPO / path).read_text().splitlines())
        missing = [line for line in code.strip("\n").splitlines() if line.strip() and line not in lines]
        assert not missing, f"{path}: {missing}"


def test_imports_name_the_installed_packages():
    assert not re.search(r"^from (strategies|clients) import", GUIDE, flags=re.M)
