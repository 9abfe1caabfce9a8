from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Fit(_message.Message):
    __slots__ = ("model", "category", "samples", "bytes_per_token", "tokens_per_message", "overhead_tokens", "rel_error", "long_rms", "margin", "output_budget", "output_source")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    BYTES_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    OVERHEAD_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REL_ERROR_FIELD_NUMBER: _ClassVar[int]
    LONG_RMS_FIELD_NUMBER: _ClassVar[int]
    MARGIN_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_BUDGET_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SOURCE_FIELD_NUMBER: _ClassVar[int]
    model: str
    category: str
    samples: int
    bytes_per_token: float
    tokens_per_message: float
    overhead_tokens: float
    rel_error: float
    long_rms: float
    margin: float
    output_budget: int
    output_source: str
    def __init__(self, model: _Optional[str] = ..., category: _Optional[str] = ..., samples: _Optional[int] = ..., bytes_per_token: _Optional[float] = ..., tokens_per_message: _Optional[float] = ..., overhead_tokens: _Optional[float] = ..., rel_error: _Optional[float] = ..., long_rms: _Optional[float] = ..., margin: _Optional[float] = ..., output_budget: _Optional[int] = ..., output_source: _Optional[str] = ...) -> None: ...

class TierState(_message.Message):
    __slots__ = ("name", "max_model_len", "budget_limit", "configured_limit", "pinned", "known", "instances", "running", "waiting", "kv_usage", "preemption_rate", "age_s", "saturated", "spilled_out")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    BUDGET_LIMIT_FIELD_NUMBER: _ClassVar[int]
    CONFIGURED_LIMIT_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    KV_USAGE_FIELD_NUMBER: _ClassVar[int]
    PREEMPTION_RATE_FIELD_NUMBER: _ClassVar[int]
    AGE_S_FIELD_NUMBER: _ClassVar[int]
    SATURATED_FIELD_NUMBER: _ClassVar[int]
    SPILLED_OUT_FIELD_NUMBER: _ClassVar[int]
    name: str
    max_model_len: int
    budget_limit: int
    configured_limit: int
    pinned: bool
    known: bool
    instances: int
    running: float
    waiting: float
    kv_usage: float
    preemption_rate: float
    age_s: float
    saturated: bool
    spilled_out: int
    def __init__(self, name: _Optional[str] = ..., max_model_len: _Optional[int] = ..., budget_limit: _Optional[int] = ..., configured_limit: _Optional[int] = ..., pinned: _Optional[bool] = ..., known: _Optional[bool] = ..., instances: _Optional[int] = ..., running: _Optional[float] = ..., waiting: _Optional[float] = ..., kv_usage: _Optional[float] = ..., preemption_rate: _Optional[float] = ..., age_s: _Optional[float] = ..., saturated: _Optional[bool] = ..., spilled_out: _Optional[int] = ...) -> None: ...

class GetCalibrationRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Calibration(_message.Message):
    __slots__ = ("worker", "workers", "b_short", "short_max_model_len", "long_max_model_len", "sample_rate", "streams", "fits", "tiers", "spillover", "adaptive")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    B_SHORT_FIELD_NUMBER: _ClassVar[int]
    SHORT_MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    LONG_MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    STREAMS_FIELD_NUMBER: _ClassVar[int]
    FITS_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    SPILLOVER_FIELD_NUMBER: _ClassVar[int]
    ADAPTIVE_FIELD_NUMBER: _ClassVar[int]
    worker: int
    workers: int
    b_short: int
    short_max_model_len: int
    long_max_model_len: int
    sample_rate: float
    streams: int
    fits: _containers.RepeatedCompositeFieldContainer[Fit]
    tiers: _containers.RepeatedCompositeFieldContainer[TierState]
    spillover: bool
    adaptive: bool
    def __init__(self, worker: _Optional[int] = ..., workers: _Optional[int] = ..., b_short: _Optional[int] = ..., short_max_model_len: _Optional[int] = ..., long_max_model_len: _Optional[int] = ..., sample_rate: _Optional[float] = ..., streams: _Optional[int] = ..., fits: _Optional[_Iterable[_Union[Fit, _Mapping]]] = ..., tiers: _Optional[_Iterable[_Union[TierState, _Mapping]]] = ..., spillover: _Optional[bool] = ..., adaptive: _Optional[bool] = ...) -> None: ...

class SetBShortRequest(_message.Message):
    __slots__ = ("b_short",)
    B_SHORT_FIELD_NUMBER: _ClassVar[int]
    b_short: int
    def __init__(self, b_short: _Optional[int] = ...) -> None: ...

class SetLimitRequest(_message.Message):
    __slots__ = ("boundary", "budget_limit", "unpin")
    BOUNDARY_FIELD_NUMBER: _ClassVar[int]
    BUDGET_LIMIT_FIELD_NUMBER: _ClassVar[int]
    UNPIN_FIELD_NUMBER: _ClassVar[int]
    boundary: int
    budget_limit: int
    unpin: bool
    def __init__(self, boundary: _Optional[int] = ..., budget_limit: _Optional[int] = ..., unpin: _Optional[bool] = ...) -> None: ...

class ReloadConfigRequest(_message.Message):
    __slots__ = ("path",)
    PATH_FIELD_NUMBER: _ClassVar[int]
    path: str
    def __init__(self, path: _Optional[str] = ...) -> None: ...

class ConfigResult(_message.Message):
    __slots__ = ("b_short", "config_toml", "restart_required", "limits")
    B_SHORT_FIELD_NUMBER: _ClassVar[int]
    CONFIG_TOML_FIELD_NUMBER: _ClassVar[int]
    RESTART_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    b_short: int
    config_toml: str
    restart_required: _containers.RepeatedScalarFieldContainer[str]
    limits: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, b_short: _Optional[int] = ..., config_toml: _Optional[str] = ..., restart_required: _Optional[_Iterable[str]] = ..., limits: _Optional[_Iterable[int]] = ...) -> None: ...

class TakeSnapshotRequest(_message.Message):
    __slots__ = ("write",)
    WRITE_FIELD_NUMBER: _ClassVar[int]
    write: bool
    def __init__(self, write: _Optional[bool] = ...) -> None: ...

class Snapshot(_message.Message):
    __slots__ = ("state_json", "samples")
    STATE_JSON_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    state_json: bytes
    samples: int
    def __init__(self, state_json: _Optional[bytes] = ..., samples: _Optional[int] = ...) -> None: ...

class RestoreSnapshotResponse(_message.Message):
    __slots__ = ("samples",)
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    samples: int
    def __init__(self, samples: _Optional[int] = ...) -> None: ...
