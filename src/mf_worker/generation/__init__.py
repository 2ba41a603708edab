"""The generator plugin API: everything a plugin author or the worker imports lives here.

A generator turns a `GenerationRequest` into a `GenerationResult`; the worker loads one with
`load_generator`, checks its output with `validate_result`, and tells transient failures
(`RetryableGenerationError`) from final ones (everything else). A plugin's own settings are a
dataclass of `setting` fields, read from the `Settings` object the loader passes to its factory
(`Settings.plugin`). See docs/plugins.md.
"""

from mf_worker.errors import PluginLoadError
from mf_worker.generation.api import (
    BlockDraft,
    CallGate,
    CallLedger,
    CallOutcome,
    CallsPaused,
    GenerationError,
    GenerationRequest,
    GenerationResult,
    Generator,
    GeneratorFn,
    InvalidOutputError,
    Memory,
    MemoryDraft,
    PermanentGenerationError,
    PlanningNote,
    PreviousEpisode,
    ProjectInfo,
    ProviderCall,
    QuotaExhaustedError,
    RateLimitedError,
    RetryableGenerationError,
    TokenUsage,
    UsageEstimator,
    estimate_max_usage,
    limit_key_of,
)
from mf_worker.generation.loader import (
    ENTRY_POINT_GROUP,
    FunctionGenerator,
    available_generators,
    load_fallback_generator,
    load_generator,
)
from mf_worker.generation.validate import MAX_TITLE_CHARS, validate_result
from mf_worker.settings import (
    Secret,
    Settings,
    boolean,
    choice,
    number,
    secret_text,
    setting,
    text,
    whole_number,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "MAX_TITLE_CHARS",
    "BlockDraft",
    "CallGate",
    "CallLedger",
    "CallOutcome",
    "CallsPaused",
    "FunctionGenerator",
    "GenerationError",
    "GenerationRequest",
    "GenerationResult",
    "Generator",
    "GeneratorFn",
    "InvalidOutputError",
    "Memory",
    "MemoryDraft",
    "PermanentGenerationError",
    "PlanningNote",
    "PluginLoadError",
    "PreviousEpisode",
    "ProjectInfo",
    "ProviderCall",
    "QuotaExhaustedError",
    "RateLimitedError",
    "RetryableGenerationError",
    "Secret",
    "Settings",
    "TokenUsage",
    "UsageEstimator",
    "available_generators",
    "boolean",
    "choice",
    "estimate_max_usage",
    "limit_key_of",
    "load_fallback_generator",
    "load_generator",
    "number",
    "secret_text",
    "setting",
    "text",
    "validate_result",
    "whole_number",
]
