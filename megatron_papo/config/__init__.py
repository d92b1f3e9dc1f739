"""One config tree of dataclasses, loaded from YAML with dotted CLI overrides, validated.

    cfg = load_config("examples/tiny_papo_g.yaml", ["parallel.tp=2", "loss.gamma=0.01"])

Every section is a dataclass with a docstring under each field (the field's documentation).
Loading is strict: an unknown key, a value of the wrong type, or a value out of range raises
`ConfigError` naming the file, the dotted key, what was expected and what was found. Every
int / float field has an entry in `NUMERIC_BOUNDS` (finite, in range; a test keeps the table
complete), checked before the cross-field rules of `validate`.

`algorithm.name` selects a preset (grpo, dapo, papo_g, papo_d) that fills the `loss:` fields and
the DAPO group filter; anything written explicitly under `loss:` or on the command line wins.

Modules (each imports only those above it):

    schema.py    the dataclasses, ConfigError, ALGORITHM_PRESETS
    checks.py    NUMERIC_BOUNDS, check_numeric_bounds, validate (cross-field rules)
    loading.py   load_config, config_from_dict, parse_override, to_dict, save_config, resume drift
    describe.py  field_docs, describe_config (the --help text)
"""

from megatron_papo.config.checks import (
    FINITE,
    NON_NEGATIVE,
    NUMERIC_BOUNDS,
    OPEN_UNIT_LEFT,
    POSITIVE,
    UNIT,
    Bound,
    check_numeric_bounds,
    numeric_fields,
    validate,
)
from megatron_papo.config.describe import describe_config, field_docs
from megatron_papo.config.loading import (
    RESUME_DRIFT_KEYS,
    config_from_dict,
    load_config,
    parse_override,
    resume_drift,
    save_config,
    to_dict,
)
from megatron_papo.config.schema import (
    ALGORITHM_PRESETS,
    AlgorithmConfig,
    AlgorithmName,
    CheckpointConfig,
    ConfigError,
    DataConfig,
    EvalConfig,
    LoggingConfig,
    ModelConfig,
    PapoConfig,
    ParallelConfig,
    RolloutConfig,
    TrainConfig,
)

__all__ = [
    "ALGORITHM_PRESETS", "FINITE", "NON_NEGATIVE", "NUMERIC_BOUNDS", "OPEN_UNIT_LEFT", "POSITIVE",
    "RESUME_DRIFT_KEYS", "UNIT", "AlgorithmConfig", "AlgorithmName", "Bound", "CheckpointConfig",
    "ConfigError", "DataConfig", "EvalConfig", "LoggingConfig", "ModelConfig", "PapoConfig",
    "ParallelConfig", "RolloutConfig", "TrainConfig", "check_numeric_bounds", "config_from_dict",
    "describe_config", "field_docs", "load_config", "numeric_fields", "parse_override",
    "resume_drift", "save_config", "to_dict", "validate",
]
