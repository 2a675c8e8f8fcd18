"""crosscoder-analyze through the real command (`python -m crosscoder.cli.analyze`): a truncated weights file
is one stderr line and exit 2. In-process: tests/unit/analysis/test_cli.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from crosscoder.constants import WEIGHTS_FILE
from tests.helpers import REPO, _truncate


def test_analyze_entry_point_reports_a_truncated_weights_file_in_one_line(dictionary_dir: Path) -> None:
    """Through the real command (`python -m crosscoder.cli.analyze`): exit 2, one stderr line, no traceback."""
    _truncate(dictionary_dir / WEIGHTS_FILE)
    result = subprocess.run([sys.executable, "-m", "crosscoder.cli.analyze", str(dictionary_dir)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith(f"crosscoder-analyze: {dictionary_dir / WEIGHTS_FILE} is truncated or not a safetensors "
                           "file (") and line.endswith("); re-export it"), line
