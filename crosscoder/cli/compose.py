"""Composing a Hydra command line outside `@hydra.main`: the typed run config a command's overrides give, and a
Hydra mistake (an unknown key, a group option that does not exist, a malformed override) as one line.

`@hydra.main` prints such a mistake over several lines with a hint about HYDRA_FULL_ERROR and exits 1; the
entry points compose first (a fraction of a second) so it is one line and exit 2, like every other bad input.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from crosscoder.errors import EXIT_BAD_INPUT, ConfigError

if TYPE_CHECKING:
    from crosscoder.config import RunConfig

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

# Lines of Hydra's and OmegaConf's messages that locate the mistake in their own terms, not the user's.
_NOISE = ("full_key:", "reference_type=", "object_type=", "Set the environment variable HYDRA_FULL_ERROR")


def composable(arguments: list[str]) -> bool:
    """Whether these arguments are plain overrides this module can compose (a flag such as --multirun, --cfg or
    --help is Hydra's own business)."""
    return not any(argument.startswith("-") for argument in arguments)


def compose_run_config(overrides: list[str]) -> RunConfig:
    """The typed config Hydra gives a run with these overrides (the same config folder and rules). The run
    directory is the one Hydra would name, so the settings that refer to it resolve."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict

    from crosscoder.config import check_known_keys, register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(Path(cfg.hydra.run.dir).absolute())
        HydraConfig.instance().set_config(cfg)
        del cfg["hydra"]
    check_known_keys(OmegaConf.to_container(cfg, resolve=False))  # type: ignore[arg-type]
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]


def hydra_error_line(error: BaseException) -> str:
    """Hydra's (multi-line) message for a bad command line, in one line: what was wrong, with the options a
    config group offers listed inline."""
    parts: list[str] = []
    options: list[str] = []
    cause = error.__cause__  # OmegaConf's reason (a key the schema lacks, a value of the wrong type)
    text = str(error) if cause is None else f"{error}\n{cause}"
    for raw in text.splitlines():
        line = raw.strip()
        if raw.startswith("\t") and options:  # an option of the group just named
            options.append(line)
            continue
        if options:
            parts[-1] += " " + ", ".join(options[1:])
            options = []
        if line.startswith("Config search path"):
            break
        if not line or line.startswith(_NOISE):
            continue
        parts.append(line.rstrip("."))
        if line.startswith("Available options"):
            options = [line]
    if options:
        parts[-1] += " " + ", ".join(options[1:])
    return "; ".join(parts) or type(error).__name__


def check_overrides(prog: str, arguments: list[str]) -> None:
    """Compose the command line as Hydra will; a mistake in it is one line and exit 2 (nothing else is checked
    here: the command's own start-up checks follow)."""
    if composable(arguments):
        with one_line_mistakes(prog):
            compose_run_config(arguments)


@contextmanager
def one_line_mistakes(prog: str) -> Iterator[None]:
    """A bad command line or setting met in the block: one line (from rank 0 of a launch; every rank meets it
    alike) and exit 2."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        yield
    except (HydraException, OmegaConfBaseException, ConfigError) as error:
        if int(os.environ.get("RANK", "0")) == 0:
            what = f"configuration error: {error}" if isinstance(error, ConfigError) else hydra_error_line(error)
            print(f"{prog}: {what}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
