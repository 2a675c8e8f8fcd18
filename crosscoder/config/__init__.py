"""Typed configuration: one module per Hydra config group (mirroring conf/), validated once with clear errors.

The YAML files in `conf/` fill these schemas; `register_configs()` puts the schemas in Hydra's ConfigStore so an
unknown key or a wrongly typed value fails at composition time; each group's `validate()` checks what types cannot
(ranges, choices) and `RunConfig.validate()` the rules that join groups. No torch, no file-system probes: those
are crosscoder.data.checks'. The allowed values of each choice are one `Literal` in its group's module.
"""

from crosscoder.config.data import CACHE_DTYPES, DATA_KINDS, CacheConfig, DataConfig, ShuffleConfig, WorkersConfig
from crosscoder.config.dictionary import (
    ACTIVATION_NAMES,
    INIT_SCHEMES,
    JUMPRELU_FAMILIES,
    CrosscoderConfig,
    JumpReLUConfig,
)
from crosscoder.config.method import METHOD_NAMES, MethodConfig
from crosscoder.config.parallel import DeepSpeedConfig, ParallelConfig
from crosscoder.config.run import RunConfig, check_known_keys, register_configs, unknown_keys
from crosscoder.config.sources import (
    HOOK_FORMS,
    HOOK_PATTERN,
    HOOK_POSITIONS,
    KIND_RULES,
    MODEL_KINDS,
    SOURCE_KINDS,
    FilesSourceConfig,
    HookPoint,
    PlantedSourceConfig,
    SourcesConfig,
    ToySourceConfig,
)
from crosscoder.config.tracking import TRACKING_MODES, TrackingConfig
from crosscoder.config.trainer import PRECISIONS, TrainerConfig

__all__ = [
    "ACTIVATION_NAMES", "CACHE_DTYPES", "DATA_KINDS", "HOOK_FORMS", "HOOK_PATTERN", "HOOK_POSITIONS", "INIT_SCHEMES",
    "KIND_RULES", "MODEL_KINDS", "JUMPRELU_FAMILIES", "METHOD_NAMES", "PRECISIONS", "SOURCE_KINDS", "TRACKING_MODES",
    "CacheConfig", "CrosscoderConfig", "DataConfig", "DeepSpeedConfig", "FilesSourceConfig", "HookPoint",
    "JumpReLUConfig", "MethodConfig", "ParallelConfig", "PlantedSourceConfig", "RunConfig", "ShuffleConfig",
    "SourcesConfig", "ToySourceConfig", "TrackingConfig", "TrainerConfig", "WorkersConfig", "check_known_keys",
    "register_configs", "unknown_keys",
]
