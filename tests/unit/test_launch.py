"""The launch configs and the container recipe: what users start jobs with must load and agree with the
package (no GPU, SLURM or Docker engine here, so these check the files, not a run). The SLURM scripts, parsed by
`bash -n`: tests/launch/test_launch.py."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType

REPO = Path(__file__).resolve().parents[2]
LAUNCH_CONFIGS = sorted((REPO / "launch").glob("*.yaml"))
PROCESSES_PER_MACHINE = {"cpu_2proc": 2, "1gpu": 1, "8gpu": 8, "2node_8gpu": 8}


def test_every_launch_config_is_listed() -> None:
    names = {path.stem for path in LAUNCH_CONFIGS}
    assert {"cpu_2proc_zero2", "cpu_2proc_zero3", "1gpu", "8gpu_zero2", "8gpu_zero3", "2node_8gpu_zero3",
            "8gpu_zero2_snapshot_parallel", "2node_8gpu_zero2_snapshot_parallel"} <= names


@pytest.mark.parametrize("path", LAUNCH_CONFIGS, ids=lambda p: p.stem)
def test_launch_config_loads_and_matches_its_name(path: Path) -> None:
    """accelerate reads it as a DeepSpeed config; the ZeRO stage and process count are what the name says."""
    config = load_config_from_file(str(path))
    assert config.distributed_type == DistributedType.DEEPSPEED
    stage = re.search(r"zero(\d)", path.stem)
    assert config.deepspeed_config.get("zero_stage") == (int(stage.group(1)) if stage else None)
    per_machine = next(n for prefix, n in sorted(PROCESSES_PER_MACHINE.items(), key=lambda kv: -len(kv[0]))
                       if path.stem.startswith(prefix))
    assert config.num_processes == config.num_machines * per_machine
    if config.num_machines > 1:  # torchrun on each node: no pdsh/ssh fan-out from the first node
        assert config.deepspeed_config.get("deepspeed_multinode_launcher") == "standard"
    assert f"--config_file launch/{path.name}" in path.read_text()  # its own usage line


def test_dockerfile_installs_the_readme_pins() -> None:
    """The image installs the package from pyproject.toml (the README's pins), nothing pinned beside it, and
    copies everything the entry point reads at run time."""
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    installs = [shlex.split(line.split("pip install", 1)[1].split("&&")[0])
                for line in dockerfile.splitlines() if "pip install" in line and not line.lstrip().startswith("#")]
    assert installs, "the Dockerfile installs nothing"
    for args in installs:
        targets = [a for a in args if not a.startswith("-")]
        assert targets == [".[hub]"], f"the image must install the package itself, not {targets}"
    assert re.search(r"^hub = \[", (REPO / "pyproject.toml").read_text(), re.MULTILINE)  # the extra exists
    assert "pip install -e '.[hub]'" in (REPO / "README.md").read_text()  # the README's GPU install
    for folder in ("crosscoder", "conf", "launch"):
        assert re.search(rf"^COPY {folder} {folder}$", dockerfile, re.MULTILINE), f"{folder}/ is not in the image"
    assert "COPY pyproject.toml" in dockerfile
