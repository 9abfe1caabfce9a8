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

class GetCalibrationRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Calibration(_message.Message):
    __slots__ = ("worker", "workers", "b_short", "short_max_model_len", "long_max_model_len", "sample_rate", "streams", "fits")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    B_SHORT_FIELD_NUMBER: _ClassVar[int]
    SHORT_MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    LONG_MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    STREAMS_FIELD_NUMBER: _ClassVar[int]
    FITS_FIELD_NUMBER: _ClassVar[int]
    worker: int
    workers: int
    b_short: int
    short_max_model_len: int
    long_max_model_len: int
    sample_rate: float
    streams: int
    fits: _containers.RepeatedCompositeFieldContainer[Fit]
    def __init__(self, worker: _Optional[int] = ..., workers: _Optional[int] = ..., b_short: _Optional[int] = ..., short_max_model_len: _Optional[int] = ..., long_max_model_len: _Optional[int] = ..., sample_rate: _Optional[float] = ..., streams: _Optional[int] = ..., fits: _Optional[_Iterable[_Union[Fit, _Mapping]]] = ...) -> None: ...

class SetBShortRequest(_message.Message):
    __slots__ = ("b_short",)
    B_SHORT_FIELD_NUMBER: _ClassVar[int]
    b_short: int
    def __init__(self, b_short: _Optional[int] = ...) -> None: ...

class ReloadConfigRequest(_message.Message):
    __slots__ = ("path",)
    PATH_FIELD_NUMBER: _ClassVar[int]
    path: str
    def __init__(self, path: _Optional[str] = ...) -> None: ...

class ConfigResult(_message.Message):
    __slots__ = ("b_short", "config_toml", "restart_required")
    B_SHORT_FIELD_NUMBER: _ClassVar[int]
    CONFIG_TOML_FIELD_NUMBER: _ClassVar[int]
    RESTART_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    b_short: int
    config_toml: str
    restart_required: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, b_short: _Optional[int] = ..., config_toml: _Optional[str] = ..., restart_required: _Optional[_Iterable[str]] = ...) -> None: ...

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
