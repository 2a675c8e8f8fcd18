"""The SLURM scripts: `bash -n` parses them, and each starts one `crosscoder-launch` per node with a
launch config of this repo. The other launch-file checks: tests/unit/test_launch.py."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("script", sorted((REPO / "launch").glob("slurm_*.sbatch")), ids=lambda p: p.stem)
def test_slurm_script_launches_one_accelerate_per_node(script: Path) -> None:
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "#SBATCH --ntasks-per-node=1" in text and "#SBATCH --nodes=2" in text
    config = re.search(r"--config_file (\S+)", text)
    assert config and (REPO / config.group(1)).is_file()
    assert '--machine_rank "$SLURM_NODEID"' in text and "hydra.run.dir=" in text
    if "snapshot_parallel" in script.stem:  # a snapshot group per node: the default the user can override
        assert 'parallel.snapshot_parallel=8 "$@"' in text
