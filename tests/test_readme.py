"""The README's Python examples run as written: all blocks, in order, as one script on one Gloo rank."""

import os
import re
import subprocess
import sys

from dist_utils import free_port

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def test_readme_examples_run(tmp_path):
    with open(README) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
    assert len(blocks) >= 8
    script = "\n".join(blocks).replace("tcp://127.0.0.1:29533", f"tcp://127.0.0.1:{free_port()}")
    script += "\ndist.destroy_process_group()\nprint('README OK')\n"
    path = tmp_path / "readme_examples.py"
    path.write_text(script)
    done = subprocess.run([sys.executable, str(path)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "README OK" in done.stdout
