"""The command-line tools' argument parsing: a mistake in the arguments is one line and exit 2, like every other
bad input (argparse's own error prints the usage first); `--help` still prints the usage."""

from __future__ import annotations

import argparse
from typing import NoReturn

from crosscoder.data.checks import device_problem
from crosscoder.errors import exit_bad_input


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        exit_bad_input(self.prog, f"{message} (see {self.prog} --help)")


def check_device(parser: argparse.ArgumentParser, device: str) -> None:
    """Refuse a --device this machine does not have, at start-up (one line, exit 2)."""
    if (problem := device_problem(device)) is not None:
        parser.error(f"--device={device}: {problem}")
