"""`crosscoder-launch`: `accelerate launch` with the same arguments, made to say a mistake the way every other
entry point does, in one line with exit 2.

Plain `accelerate launch` reports any rank that stops as its own `ChildFailedError` traceback and exits 1,
whatever status the rank chose. This wrapper (1) checks the configuration of a crosscoder command in this
process first (the same start-up checks the ranks run: settings, paths, the snapshots' configs, W&B
credentials), so a mistake is one line and exit 2 before any rank starts or any op is compiled; (2) runs
accelerate's own launcher in this process and, when a rank stops, exits with that rank's status, the rank's own
line being the message: the launcher's report and its shutdown logs are printed only for a crash (a status
other than the ones crosscoder sets deliberately).
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from crosscoder.cli.compose import composable, compose_run_config, one_line_mistakes
from crosscoder.errors import EXIT_BAD_INPUT

PROG = "crosscoder-launch"

# Ranks that stop deliberately say why in one line of their own (crosscoder.cli.train.run_command): 2 bad input,
# 1 a fault during the run (a training state saved), 128 + a signal for a stop asked by a signal.
TRAIN_MODULES = ("crosscoder.train", "crosscoder.cli.train")
CACHE_MODULES = ("crosscoder.cli.cache",)


def check_train(overrides: list[str]) -> None:
    from crosscoder.data.checks import check_inputs
    from crosscoder.training.tracking import check_credentials

    cfg = check_inputs(compose_run_config(overrides))
    check_credentials(cfg.tracking)


def check_cache(overrides: list[str]) -> None:
    from crosscoder.data.checks import check_inputs

    check_inputs(compose_run_config(overrides))


CHECKS: dict[str, Callable[[list[str]], None]] = {
    **dict.fromkeys(TRAIN_MODULES, check_train), **dict.fromkeys(CACHE_MODULES, check_cache)}
"""The start-up checks of each crosscoder module a launch can run (by its `-m` name)."""


def check_before_launch(module: str, overrides: list[str]) -> None:
    """Run `module`'s start-up checks here; a mistake is one line and exit 2. A Hydra command line this wrapper
    cannot compose alone (a flag such as --multirun) is left to the ranks."""
    check = CHECKS.get(module)
    if check is not None and composable(overrides):
        with one_line_mistakes(PROG):
            check(overrides)


@contextmanager
def held_launcher_logs() -> Iterator[list[logging.LogRecord]]:
    """Hold back what the launcher's process supervision logs (closing signals sent, a rank's exit code): it only
    speaks when a rank stops. The records are yielded for replay when the stop was a crash."""
    supervision = logging.getLogger("torch.distributed.elastic")
    held: list[logging.LogRecord] = []

    class Hold(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            held.append(record)

    handler, propagate = Hold(), supervision.propagate
    supervision.addHandler(handler)
    supervision.propagate = False
    try:
        yield held
    finally:
        supervision.removeHandler(handler)
        supervision.propagate = propagate


def exit_status(returncode: int) -> int:
    """A process's status as a shell reports it (a signal's death is 128 + the signal)."""
    return 128 - returncode if returncode < 0 else returncode


def deliberate(status: int) -> bool:
    """A status crosscoder's ranks exit with after printing their own line (see run_command)."""
    return status in (1, EXIT_BAD_INPUT) or status - 128 in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def launch(args) -> int:  # noqa: ANN001 (accelerate's parsed arguments)
    """accelerate's launcher in this process; the status of the first rank that stopped (0 when none did)."""
    from accelerate.commands.launch import launch_command
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    with held_launcher_logs() as held:
        try:
            launch_command(args)
            return 0
        except ChildFailedError as failed:
            rank, failure = failed.get_first_failure()
            status = exit_status(failure.exitcode)
            crashed = not deliberate(status)
            report = str(failed)
        except subprocess.CalledProcessError as failed:  # one process, or a DeepSpeed multi-node launcher
            rank, status = 0, exit_status(failed.returncode)
            crashed, report = not deliberate(status), ""
    if crashed:
        for record in held:
            logging.getLogger(record.name).handle(record)
        print(f"{report}\n{PROG}: rank {rank} crashed with exit status {status}; its output above says where",
              file=sys.stderr)
    return status


def main(argv: list[str] | None = None) -> None:
    from accelerate.commands.launch import launch_command_parser

    from crosscoder.cli.arguments import ArgumentParser

    # accelerate's own parser, so every `accelerate launch` option means the same here; its mistakes are one line
    parser = launch_command_parser()
    parser.__class__ = ArgumentParser
    parser.prog = PROG
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.module:
        check_before_launch(args.training_script, list(args.training_script_args))
    sys.exit(launch(args))


if __name__ == "__main__":
    main()
