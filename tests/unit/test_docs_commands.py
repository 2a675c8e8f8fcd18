"""The commands README.md and docs/ show are true: every trainer or cache invocation in a fenced bash / sh /
console block composes through Hydra from conf/ and passes the checks the entry point makes before it trains
(crosscoder.train.run_command: unknown keys, the typed RunConfig, RunConfig.validate()), job by job for a
sweep; a `method.snapshot` names one of the sources' snapshots; the launch files a command names exist; and the
README's relative links (into docs/) point at files and headings that exist. Nothing trains, nothing loads a
model or reaches the network."""

from __future__ import annotations

import contextlib
import functools
import io
import itertools
import json
import re
import shlex
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import open_dict

from crosscoder.cli.train import CONF_DIR, run_command

REPO = Path(__file__).resolve().parents[2]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_FENCES = {"bash", "sh", "shell", "console"}
ENTRY_SCRIPTS = {"crosscoder-train": "train", "crosscoder-cache": "cache"}
ENTRY_MODULES = {"crosscoder.train": "train", "crosscoder.cli.cache": "cache"}
SEPARATORS = {"&&", "||", ";", "|", "&"}
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[\w+-]*)")
LINK = re.compile(r"\[[^\]]*\]\((?P<target>[^)\s]+)\)")
# What a files source folder holds at least: the example of docs/sources-and-data.md ("Activations you already
# have"); the config checks read only sources.json.
FILES_SOURCES_JSON = {"sources": [{"name": "L2", "layer": 2}, {"name": "L4", "layer": 4}], "hook": "resid_pre"}


@dataclass(frozen=True)
class Invocation:
    where: str  # page:line
    entry: str  # train or cache
    arguments: tuple[str, ...]
    launch_files: tuple[str, ...]  # accelerate --config_file, hydra.launcher.config_file, sbatch scripts


def shell_blocks(page: Path) -> list[tuple[int, str]]:
    """(first line number, text) of every fenced bash / sh / console block, dedented; console keeps `$ ` lines."""
    blocks, lines, index = [], page.read_text().splitlines(), 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        index += 1
        if not opening:
            continue
        fence, indent, body, start = opening["fence"], len(opening["indent"]), [], index + 1
        while index < len(lines) and not lines[index].strip().startswith(fence):
            body.append(lines[index][indent:])
            index += 1
        index += 1
        language = opening["info"].lower()
        if language == "console":
            body = [line[2:] for line in body if line.startswith("$ ")]
        if language in SHELL_FENCES:
            blocks.append((start, "\n".join(body)))
    return blocks


def commands(text: str) -> list[tuple[int, list[str]]]:
    """(line offset, words) of each simple command: continuations joined, comments dropped, split at && ; |."""
    found, offset = [], 0
    for line in text.replace("\\\n", " \x00").split("\n"):
        lexer = shlex.shlex(line.replace("\x00", ""), posix=True, punctuation_chars=True)
        lexer.whitespace_split, lexer.commenters = True, "#"
        words: list[str] = []
        for token in [*lexer, ";"]:
            if token in SEPARATORS:
                if words:
                    found.append((offset, words))
                words = []
            else:
                words.append(token)
        offset += 1 + line.count("\x00")
    return found


def invocation(where: str, words: list[str]) -> Invocation | None:
    """The trainer or cache invocation in one command (the script, `-m <module>` under python or accelerate, or
    a launch/*.sbatch script, whose extra arguments are Hydra overrides), or None."""
    launch_files = [words[i + 1] for i, word in enumerate(words[:-1]) if word == "--config_file"]
    for i, word in enumerate(words):
        entry, last = ENTRY_SCRIPTS.get(Path(word).name), i  # last: the word the overrides follow
        if entry is None and word == "-m" and i + 1 < len(words):
            entry, last = ENTRY_MODULES.get(words[i + 1]), i + 1
        if entry is None and Path(word).name == "sbatch" and i + 1 < len(words):
            entry, last = "train", i + 1
            launch_files.append(words[last])
        if entry is not None:
            arguments = tuple(words[last + 1 :])
            launch_files += [a.split("=", 1)[1] for a in arguments if a.startswith("hydra.launcher.config_file=")]
            return Invocation(where, entry, arguments, tuple(launch_files))
    return None


def documented_invocations() -> list[Invocation]:
    found = []
    for page in PAGES:
        for start, text in shell_blocks(page):
            for offset, words in commands(text):
                if (call := invocation(f"{page.relative_to(REPO)}:{start + offset}", words)) is not None:
                    found.append(call)
    return found


INVOCATIONS = documented_invocations()


def jobs(call: Invocation) -> list[list[str]]:
    """The override lists the command runs: one, or every job of a --multirun sweep (Hydra's basic sweeper's
    cartesian product)."""
    multirun, overrides, arguments = False, [], list(call.arguments)
    while arguments:
        argument = arguments.pop(0)
        if argument in ("--multirun", "-m"):
            multirun = True
        elif argument in ("--cfg", "-c"):  # print the config instead of running: composes all the same
            arguments.pop(0)
        elif argument.startswith("-"):
            pytest.fail(f"{call.where}: {argument} is not a Hydra flag this test knows; extend jobs()")
        else:
            overrides.append(argument)
    parsed = OverridesParser.create().parse_overrides(overrides)
    sweeps = [override.input_line for override in parsed if override.is_sweep_override()]
    assert multirun or not sweeps, f"{call.where}: sweep values {sweeps} need --multirun"
    choices = [[f"{override.get_key_element()}={value}" for value in override.sweep_string_iterator()]
               if override.is_sweep_override() else [override.input_line] for override in parsed]
    return [list(job) for job in itertools.product(*choices)]


def snapshot_names(run) -> list[str] | None:  # noqa: ANN001 (a RunConfig)
    """The names a run's snapshots get, from the config alone (as crosscoder/sources.py names them); None for a
    files source, whose names are in its sources.json."""
    s = run.sources
    if s.kind == "toy":
        return [f"step{step}" for step in s.toy.snapshot_steps]
    if s.kind == "planted":
        return [f"snapshot{index}" for index in range(s.planted.n_snapshots)]
    if s.kind == "hf":
        return [Path(path).name for path in s.paths] if s.paths else (list(s.revisions) or ["main"])
    return None


@functools.cache
def validated(job: tuple[str, ...]):  # noqa: ANN201 (a RunConfig, or the entry point's refusal as a str)
    """Compose as `crosscoder-train <job>` does and run the entry point's checks (once per distinct job: the
    pages repeat commands). A relative files-source folder is made, with a sample sources.json, in the cwd."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True,
                      overrides=[*job, f"hydra.runtime.output_dir={Path.cwd() / 'run'}"])
    hydra_config = HydraConfig.instance()
    previous = hydra_config.cfg
    hydra_config.set_config(cfg)
    try:
        with open_dict(cfg):
            del cfg["hydra"]  # what the entry point gets: the job's config, with the Hydra config beside it
        files_dir = cfg.sources.files.dir if cfg.sources.kind == "files" else None
        if files_dir and not Path(files_dir).is_absolute():
            Path(files_dir).mkdir(parents=True, exist_ok=True)
            (Path(files_dir) / "sources.json").write_text(json.dumps(FILES_SOURCES_JSON))
        refusal = io.StringIO()
        try:
            with contextlib.redirect_stderr(refusal):
                return run_command("docs", cfg, lambda run: run.validate())
        except SystemExit as stop:
            return f"refused (exit {stop.code}): {refusal.getvalue().strip()}"
    finally:
        hydra_config.cfg = previous


def test_the_pages_show_trainer_commands() -> None:
    """The extraction finds what the pages show (a fence or a continuation it cannot read would hide them)."""
    where = {call.where.split(":")[0] for call in INVOCATIONS}
    assert {"README.md", "docs/configuration.md", "docs/parallel-and-launching.md", "docs/analysis.md"} <= where
    assert any(call.entry == "cache" for call in INVOCATIONS)
    assert any("--multirun" in call.arguments for call in INVOCATIONS)


@pytest.mark.parametrize("call", INVOCATIONS, ids=[call.where for call in INVOCATIONS])
def test_documented_command_composes_and_validates(call: Invocation, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Each job of the command composes into a RunConfig the entry point accepts; what it names exists."""
    for launch_file in call.launch_files:
        assert (REPO / launch_file).is_file(), f"{call.where}: {launch_file} does not exist"
    monkeypatch.chdir(tmp_path)  # relative folders the command names (sources.files.dir) resolve here
    for job in jobs(call):
        run = validated(tuple(job))
        assert not isinstance(run, str), f"{call.where}: {' '.join(job)}: {run}"
        if run.method.snapshot and (names := snapshot_names(run)) is not None:
            assert run.method.snapshot in names, (
                f"{call.where}: method.snapshot={run.method.snapshot} is not one of the snapshots {names}")
        if call.entry == "cache":
            assert run.data.cache.dir, f"{call.where}: crosscoder-cache needs data.cache.dir"


def slug(heading: str) -> str:
    """The anchor MkDocs (Python-Markdown's toc) gives a heading."""
    text = unicodedata.normalize("NFKD", heading.replace("`", "").replace("*", ""))
    text = re.sub(r"[^\w\s-]", "", text.encode("ascii", "ignore").decode()).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def test_readme_links_exist() -> None:
    """Every relative link in README.md (those into docs/ above all) names a file, and a heading of it."""
    readme = (REPO / "README.md").read_text()
    targets = [m["target"] for m in LINK.finditer(readme) if not re.match(r"[a-z]+:|#", m["target"])]
    assert any(target.startswith("docs/") for target in targets)
    for target in targets:
        path, _, anchor = target.partition("#")
        assert (REPO / path).exists(), f"README.md links to {target}: {path} does not exist"
        if anchor and path.endswith(".md"):
            headings = re.findall(r"^#{1,6}\s+(.+?)\s*#*$", (REPO / path).read_text(), flags=re.MULTILINE)
            assert anchor in {slug(heading) for heading in headings}, f"README.md links to {target}: no such heading"
