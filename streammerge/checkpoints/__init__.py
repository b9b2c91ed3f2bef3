"""Reading safetensors checkpoints: strict header validation and model resolution."""

from streammerge.checkpoints.model import (
    ModelCheckpoint,
    TensorHandle,
    open_model,
    looks_like_path,
    resolve_model_dir,
)
from streammerge.checkpoints.safetensors_header import (
    DTYPE_BITS,
    MAX_HEADER_BYTES,
    SafetensorsHeader,
    TensorEntry,
    parse_header,
    read_header,
)

__all__ = [
    "DTYPE_BITS",
    "MAX_HEADER_BYTES",
    "ModelCheckpoint",
    "SafetensorsHeader",
    "TensorEntry",
    "TensorHandle",
    "open_model",
    "parse_header",
    "read_header",
    "looks_like_path",
    "resolve_model_dir",
]
