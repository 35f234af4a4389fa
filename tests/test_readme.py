"""The Python examples of the README and of every page in docs/ run as written, on one Gloo rank.

The README's blocks run as one script, in order. Each docs page's blocks run, in order, after the
README's first block (which initialises the process group and defines ``x``, ``y``, ``model`` and
``state``), each page in its own process.
"""

import glob
import os
import re
import subprocess
import sys

import pytest

from dist_utils import free_port

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
README = os.path.join(ROOT, "README.md")
DOC_PAGES = sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def python_blocks(path: str) -> list[str]:
    with open(path) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


def run_script(blocks: list[str], tmp_path) -> None:
    script = "\n".join(blocks).replace("tcp://127.0.0.1:29533", f"tcp://127.0.0.1:{free_port()}")
    script += "\ndist.destroy_process_group()\nprint('EXAMPLES OK')\n"
    path = tmp_path / "examples.py"
    path.write_text(script)
    done = subprocess.run([sys.executable, str(path)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "EXAMPLES OK" in done.stdout


def test_readme_examples_run(tmp_path):
    blocks = python_blocks(README)
    assert len(blocks) >= 1 and "init_process_group" in blocks[0]
    run_script(blocks, tmp_path)


def test_docs_pages_exist_and_are_linked_from_the_readme():
    assert len(DOC_PAGES) >= 7
    readme = open(README).read()
    for page in DOC_PAGES:
        assert f"docs/{os.path.basename(page)}" in readme, f"{page} is not linked from the README"


@pytest.mark.parametrize("page", [p for p in DOC_PAGES if python_blocks(p)], ids=os.path.basename)
def test_docs_examples_run(page, tmp_path):
    run_script(python_blocks(README)[:1] + python_blocks(page), tmp_path)
