"""Configuration: `RunConfig.validate()` names the bad value (data.paths files by the start-up check, before anything
loads); the repo's conf/ composes into a RunConfig. Through the real entry point: tests/launch/test_config.py."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, OmegaConf

import crosscoder.cli.train  # noqa: F401  (registers the schema in Hydra's ConfigStore)
from crosscoder.config import CrosscoderConfig, RunConfig, check_known_keys
from crosscoder.data.checks import TEXT_PROBE_BYTES, check_inputs
from crosscoder.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def _valid() -> RunConfig:
    """The schema defaults with the toy source (the dataclass default `hf` needs a model)."""
    cfg = RunConfig(output_dir="/tmp/run")
    cfg.sources.kind = "toy"
    return cfg


def _set(path: str, value: object) -> Callable[[RunConfig], None]:
    *sections, key = path.split(".")

    def mutate(cfg: RunConfig) -> None:
        node: object = cfg
        for section in sections:
            node = getattr(node, section)
        setattr(node, key, value)

    return mutate


def test_valid_config_passes_and_returns_self() -> None:
    """The baseline used below is valid, so each error below comes from the one bad value."""
    cfg = _valid()
    assert cfg.validate() is cfg


def test_pinned_cores_are_checked_against_the_machine_at_start_up() -> None:
    """A core the machine does not have is refused by the start-up check (the config alone cannot know)."""
    cfg = _valid()
    _set("data.workers.cpus", [0, 4096])(cfg)
    with pytest.raises(ConfigError, match=r"data\.workers\.cpus contains 4096"):
        check_inputs(cfg)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (_set("crosscoder.dict_size", 0), r"crosscoder\.dict_size=0"),
        (_set("crosscoder.dict_size", -4), r"crosscoder\.dict_size=-4"),
        (lambda c: setattr(c, "crosscoder", CrosscoderConfig(activation="topk", dict_size=8, k=9)),
         r"crosscoder\.k=9 .*dict_size=8"),
        (lambda c: setattr(c, "crosscoder", CrosscoderConfig(activation="batchtopk", dict_size=8, k=0)),
         r"crosscoder\.k=0"),
        (_set("crosscoder.activation", "gelu"), r"crosscoder\.activation='gelu'"),
        (_set("data.kind", "parquet"), r"data\.kind='parquet'"),
        (_set("data.workers.num_workers", -1), r"data\.workers\.num_workers=-1"),
        (_set("data.workers.device", "tpu"), r"data\.workers\.device='tpu'"),
        (_set("data.shuffle.refill_fraction", 0.0), r"data\.shuffle\.refill_fraction=0\.0"),
        (_set("data.shuffle.buffer_tokens", -1), r"data\.shuffle\.buffer_tokens=-1"),
        (_set("data.cache.dtype", "int8"), r"data\.cache\.dtype='int8'"),
        (_set("data.cache.shard_batches", 0), r"data\.cache\.shard_batches=0"),
        (_set("sources.kind", "onnx"), r"sources\.kind='onnx'"),
        (_set("trainer.total_tokens", 100), r"trainer\.total_tokens=100 .*batch_size=1024"),
        (_set("deepspeed.zero_stage", 5), r"deepspeed\.zero_stage=5"),
        (_set("trainer.precision", "fp8"), r"trainer\.precision='fp8'"),
        (_set("data.seq_len", 1), r"data\.seq_len=1"),
        (_set("trainer.lr", 0.0), r"trainer\.lr=0\.0"),
        (_set("sources.hook", "resid_mid"), r"sources\.hook='resid_mid'"),
        (_set("method.name", "sae_lens"), r"method\.name='sae_lens'"),
        (lambda c: (_set("method.name", "independent")(c), _set("crosscoder.activation", "snapshot_jumprelu")(c)),
         r"snapshot_jumprelu gates latents per snapshot .* use jumprelu"),
        (lambda c: (_set("method.name", "independent")(c), _set("method.snapshot", "step0")(c)),
         r"method\.snapshot='step0' trains one snapshot's dictionary: use it with method\.name=crosscoder"),
        (lambda c: (_set("method.name", "independent")(c), _set("crosscoder.init_from", "/a/dictionary")(c)),
         r"crosscoder\.init_from warm-starts one dictionary"),
        (lambda c: (_set("method.name", "independent")(c), _set("sources.toy.snapshot_steps", [5])(c)),
         r"needs at least 2 snapshots, the sources name 1"),
        (lambda c: (_set("method.snapshot", "step0")(c), _set("parallel.snapshot_parallel", 2)(c)),
         r"method\.snapshot='step0' trains one snapshot: it cannot be split"),
        (lambda c: (_set("method.name", "sae_track")(c), _set("parallel.snapshot_parallel", 2)(c)),
         r"method\.name=sae_track trains one snapshot at a time"),
        (lambda c: (_set("method.name", "sae_track")(c), _set("method.link_tokens", -1)(c)), r"method\.link_tokens=-1"),
        (lambda c: (_set("method.name", "independent")(c), _set("method.link_lr", 1e-4)(c)),
         r"link_tokens and link_lr are SAE-Track's; method\.name=independent"),
    ],
)
def test_validate_names_the_bad_value(mutate: Callable[[RunConfig], None], message: str) -> None:
    """Each invalid value is a ConfigError whose message names the key and the value."""
    cfg = _valid()
    mutate(cfg)
    with pytest.raises(ConfigError, match=message):
        cfg.validate()


def test_a_run_of_zero_training_steps_is_refused() -> None:
    """total_tokens below one batch would train 0 steps and export the untrained initial dictionary: refused,
    naming both values; exactly one batch is one step, and fine."""
    cfg = _valid()
    cfg.trainer.batch_size, cfg.trainer.total_tokens = 512, 511
    with pytest.raises(ConfigError, match=r"trainer\.total_tokens=511 .*trainer\.batch_size=512\).*zero steps"):
        cfg.validate()
    cfg.trainer.total_tokens = 512
    cfg.validate()


# ---- data.paths, checked before anything loads ---------------------------------------------------------------


def _text_files(tmp_path: Path, *contents: str | bytes) -> RunConfig:
    """A valid run reading one good .txt file, then one file per `contents` (str: UTF-8 text, bytes: raw)."""
    cfg = _valid()
    good = tmp_path / "good.txt"
    good.write_text("A first document.\n\nA second one.\n")
    paths = [good]
    for i, content in enumerate(contents):
        path = tmp_path / f"file{i}.txt"
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        paths.append(path)
    cfg.data.kind, cfg.data.paths = "text_files", [str(p) for p in paths]
    return cfg


def test_text_files_that_exist_and_hold_text_pass(tmp_path: Path) -> None:
    """Readable non-blank files pass, .jsonl and `~` paths included; a text after a blank stretch counts."""
    cfg = _text_files(tmp_path, '{"text": "a json document"}\n', "\n\n   \n\tlate text\n", "é" * 3000)
    assert cfg.validate() is cfg
    home = Path.home()
    if tmp_path.is_relative_to(home):
        cfg.data.paths = ["~/" + str((tmp_path / "good.txt").relative_to(home))]
        cfg.validate()


def _missing(folder: Path) -> Path:
    return folder / "nope.txt"


def _directory(folder: Path) -> Path:
    (folder / "folder").mkdir()
    return folder / "folder"


def _empty(folder: Path) -> Path:
    (folder / "empty.txt").touch()
    return folder / "empty.txt"


def _blank(folder: Path) -> Path:
    (folder / "blank.txt").write_text(" \n\n\t \n" * 2000)  # beyond the first 4 KB read
    return folder / "blank.txt"


def _binary(folder: Path) -> Path:
    (folder / "corpus.txt.gz").write_bytes(b"\x1f\x8b\x08\x00binary")
    return folder / "corpus.txt.gz"


@pytest.mark.parametrize(("make", "message"), [
    (_missing, r"data\.paths\[1\]='.*/nope\.txt' does not exist"),
    (_directory, r"data\.paths\[1\]='.*/folder' is a directory"),
    (_empty, r"data\.paths\[1\]='.*/empty\.txt' is empty$"),
    (_blank, r"data\.paths\[1\]='.*/blank\.txt' is empty \(whitespace only\)"),
    (_binary, r"data\.paths\[1\]='.*/corpus\.txt\.gz' is not UTF-8 text"),
])
def test_a_bad_text_file_is_named_by_index_and_path(make: Callable[[Path], Path], message: str,
                                                    tmp_path: Path) -> None:
    """Missing, a directory, empty, whitespace only, or binary: a ConfigError naming data.paths[i] and the path,
    at validate() (before any snapshot or worker starts)."""
    cfg = _text_files(tmp_path)
    cfg.data.paths.append(str(make(tmp_path)))
    with pytest.raises(ConfigError, match=message):
        check_inputs(cfg)


def test_no_text_files_and_an_unreadable_one_are_refused(tmp_path: Path) -> None:
    cfg = _text_files(tmp_path)
    cfg.data.paths = []
    with pytest.raises(ConfigError, match=r"data\.paths must list at least one file for data\.kind=text_files"):
        check_inputs(cfg)
    if os.geteuid() == 0:
        return  # root reads any file
    cfg = _text_files(tmp_path, "secret text")
    Path(cfg.data.paths[1]).chmod(0)
    with pytest.raises(ConfigError, match=r"data\.paths\[1\]='.*/file0\.txt' cannot be read \(Permission denied\)"):
        check_inputs(cfg)


def test_the_blank_probe_is_bounded(tmp_path: Path) -> None:
    """Only the first TEXT_PROBE_BYTES are read: a longer blank stretch is left to the token stream's own
    check (no document), so start-up never reads a whole corpus."""
    cfg = _text_files(tmp_path, " " * (TEXT_PROBE_BYTES + 10))
    check_inputs(cfg)


def test_text_files_are_not_checked_when_training_from_a_complete_cache(tmp_path: Path) -> None:
    """A complete activation cache holds the tokens, so its corpus may be gone; an incomplete one is built from
    the corpus, so the files are checked."""
    cfg = _text_files(tmp_path, "")
    cache = tmp_path / "acts"
    cache.mkdir()
    cfg.data.cache.dir = str(cache)
    with pytest.raises(ConfigError, match="is empty"):
        check_inputs(cfg)
    (cache / "manifest.json").write_text("{}")
    check_inputs(cfg)


def test_k_larger_than_dict_size_is_fine_for_relu() -> None:
    """k only constrains the TopK activations."""
    cfg = _valid()
    cfg.crosscoder = CrosscoderConfig(activation="relu", dict_size=8, k=9)
    cfg.validate()


def test_hf_sources_need_a_model() -> None:
    """sources.kind=hf with neither a model nor paths is an error naming sources.model; with both too."""
    cfg = _valid()
    cfg.sources.kind = "hf"
    with pytest.raises(ConfigError, match=r"sources\.model"):
        cfg.validate()
    cfg.sources.model = "EleutherAI/pythia-70m"
    cfg.validate()
    cfg.sources.paths = ["/a"]
    with pytest.raises(ConfigError, match="not both"):
        cfg.validate()
    cfg.sources.paths, cfg.sources.revisions, cfg.sources.steps = [], ["step0", "step1"], [0]
    with pytest.raises(ConfigError, match=r"sources\.steps has 1 entries for 2 snapshots"):
        cfg.validate()


# ---- Hydra composition of conf/ ----------------------------------------------------------------------------


def _compose(overrides: list[str], tmp_path: Path) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=[f"output_dir={tmp_path}", *overrides])


def test_default_composes_into_a_valid_run_config(tmp_path: Path) -> None:
    """No overrides: the embedded toy default, ReLU crosscoder, offline tracking, as a typed RunConfig."""
    cfg = _compose([], tmp_path)
    run = OmegaConf.to_object(cfg)
    assert isinstance(run, RunConfig)
    assert run.validate() is run
    assert run.output_dir == str(tmp_path)
    assert (run.sources.kind, run.data.kind, run.crosscoder.activation) == ("toy", "toy", "relu")
    assert run.sources.hook == "blocks.1.hook_resid_pre"
    assert run.sources.toy.snapshot_steps == [0, 3, 8, 20, 45, 100, 180, 300]
    assert run.tracking.mode == "offline"
    assert run.sources.trust_remote_code is False


def test_group_override_swaps_the_crosscoder(tmp_path: Path) -> None:
    """`crosscoder=topk` selects conf/crosscoder/topk.yaml; a key override then refines it."""
    run = OmegaConf.to_object(_compose(["crosscoder=topk", "crosscoder.k=8"], tmp_path))
    assert isinstance(run, RunConfig)
    assert (run.crosscoder.activation, run.crosscoder.k, run.crosscoder.dict_size) == ("topk", 8, 1024)
    run = OmegaConf.to_object(_compose(["crosscoder=batchtopk", "deepspeed=zero3"], tmp_path))
    assert run.crosscoder.activation == "batchtopk" and run.deepspeed.zero_stage == 3


def test_unknown_key_fails_at_composition(tmp_path: Path) -> None:
    """A key the schema does not have is rejected when composing, naming it."""
    with pytest.raises(ConfigCompositionException, match="bogus"):
        _compose(["crosscoder.bogus=1"], tmp_path)


def test_an_added_unknown_key_is_refused_however_it_is_spelled(tmp_path: Path) -> None:
    """`+crosscoder.dict_sise=256` (what Hydra itself suggests for a typo) composes, but must not be ignored:
    the check names it and the key it probably meant; free-form dicts (deepspeed.extra) take any key."""
    cases = (("+crosscoder.dict_sise=256", "crosscoder.dict_sise (did you mean crosscoder.dict_size?)"),
             ("+bogus=1", "bogus"), ("+data.cache.tokenz=5", "data.cache.tokenz (did you mean"))
    for override, message in cases:
        tree = OmegaConf.to_container(_compose([override], tmp_path), resolve=False)
        with pytest.raises(ConfigError, match=re.escape(message)):
            check_known_keys(tree)
    check_known_keys(OmegaConf.to_container(_compose(["+deepspeed.extra.steps_per_print=5"], tmp_path),
                                            resolve=False))
    check_known_keys(OmegaConf.to_container(_compose([], tmp_path), resolve=False))


def test_wrongly_typed_value_fails_at_composition(tmp_path: Path) -> None:
    """A value of the wrong type is rejected when composing."""
    with pytest.raises(ConfigCompositionException, match="dict_size"):
        _compose(["crosscoder.dict_size=many"], tmp_path)


def test_output_dir_interpolates_hydra_runtime(tmp_path: Path) -> None:
    """Without an override, output_dir is `${hydra:runtime.output_dir}` and resolves to Hydra's run dir."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["hydra.runtime.output_dir=" + str(tmp_path / "run")],
                      return_hydra_config=True)
    assert OmegaConf.to_container(cfg)["output_dir"] == "${hydra:runtime.output_dir}"
    hydra_config = HydraConfig.instance()
    previous = hydra_config.cfg
    hydra_config.set_config(cfg)
    try:
        assert cfg.output_dir == str(tmp_path / "run")
    finally:
        hydra_config.cfg = previous
