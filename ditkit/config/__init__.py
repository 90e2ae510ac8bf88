"""Every typed config of ditkit, its flag metadata, and the one validator (config.base).

The bottom layer of the package: it imports nothing else of ditkit. Each module holds the configs
of one part: models, objectives, sampling, training, and the other commands.
"""

from .base import *  # noqa: F401,F403
from .base import Config, Grouped, build_config, field_default, flag, from_record, leaf_fields, leaf_hints, option, unwrap_optional, validate  # noqa: F401
from .commands import DIFFUSERS_SAMPLERS, EXPORT_FORMATS, EMAConfig, EvalConfig, ExportConfig, ExtractConfig, FlopsConfig, StudyConfig  # noqa: F401
from .models import DataShape, DiTConfig, DiTDesign, MMDiTConfig, TextEncoderRecord, TransformerConfig, UNetConfig, UViTConfig, VideoDesign, VideoDiTConfig, VideoMMDiTConfig, axis_split  # noqa: F401
from .objectives import ObjectiveConfig, ObjectiveFlags  # noqa: F401
from .sampling import GenerateRequest, RecordedSampling, SampleConfig, SampleNpzConfig, Sampling, SamplingOptions, ServeConfig, check_sampler  # noqa: F401
from .training import (  # noqa: F401
    AdapterRecord,
    DataOptions,
    DistillConfig,
    DPOConfig,
    EMAOptions,
    LoraOptions,
    NetOptions,
    OptimOptions,
    RunOptions,
    SamplingDefaults,
    SystemOptions,
    TrainConfig,
)
