"""Configuration: `RunConfig.validate()` names the bad value; the repo's conf/ composes into a RunConfig."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, OmegaConf

import crosscoder.train  # noqa: F401  (registers the schema in Hydra's ConfigStore)
from crosscoder.config import ConfigError, CrosscoderConfig, RunConfig, check_known_keys

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


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
        (_set("data.workers.cpus", [0, 4096]), r"data\.workers\.cpus contains 4096"),
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
    ],
)
def test_validate_names_the_bad_value(mutate: Callable[[RunConfig], None], message: str) -> None:
    """Each invalid value is a ConfigError whose message names the key and the value."""
    cfg = _valid()
    mutate(cfg)
    with pytest.raises(ConfigError, match=message):
        cfg.validate()


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
