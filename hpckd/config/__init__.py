"""The experiment schema (:mod:`~hpckd.config.schema`, :mod:`~hpckd.config.methods`) and its loading
(:mod:`~hpckd.config.loading`). The bottom of the layer order: nothing here imports hpckd's subpackages."""

from hpckd.config.loading import (
    describe_config_error,
    field_names,
    field_type_name,
    load_config,
    to_container,
)
from hpckd.config.methods import BatchOpsConfig, DAConfig, LossConfig, TargetsConfig, WSLConfig
from hpckd.config.schema import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataConfig,
    DistConfig,
    EvaluatorOptions,
    Experiment,
    MetricsConfig,
    ModelConfig,
    OptimConfig,
    ServingConfig,
    TeacherConfig,
    TrainConfig,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BatchOpsConfig",
    "DAConfig",
    "DataConfig",
    "DistConfig",
    "EvaluatorOptions",
    "Experiment",
    "LossConfig",
    "MetricsConfig",
    "ModelConfig",
    "OptimConfig",
    "ServingConfig",
    "TargetsConfig",
    "TeacherConfig",
    "TrainConfig",
    "WSLConfig",
    "describe_config_error",
    "field_names",
    "field_type_name",
    "load_config",
    "to_container",
]
