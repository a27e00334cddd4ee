"""Safe encoding of non-tensor state (step counters, hyper-parameters, RNG seeds...).

Non-tensor values are stored as JSON with a few tagged types (tuple, bytes, non-finite floats,
``torch.dtype``/``torch.Size``), never as pickle: loading a checkpoint must not run code from it
(DCP's default planner uses ``torch.save``/``torch.load(weights_only=False)`` here).
"""

from __future__ import annotations

import base64
import json
import math
from typing import Any

import torch

from .errors import CorruptCheckpointError, StateMismatchError

_TAG = "__ckptio__"
MAX_BYTES = 64 << 20  # a non-tensor value larger than this is almost certainly a mistake


def _enc(obj: Any, where: str) -> Any:
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {_TAG: "float", "v": repr(obj)}
    if isinstance(obj, torch.Size):
        return {_TAG: "size", "v": list(obj)}
    if isinstance(obj, tuple):
        return {_TAG: "tuple", "v": [_enc(x, where) for x in obj]}
    if isinstance(obj, list):
        return [_enc(x, where) for x in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return (
                {_TAG: "dict", "v": {k: _enc(v, where) for k, v in obj.items()}}
                if _TAG in obj
                else {k: _enc(v, where) for k, v in obj.items()}
            )
        if all(isinstance(k, (str, int)) and not isinstance(k, bool) for k in obj):
            return {_TAG: "kdict", "v": [[k, _enc(v, where)] for k, v in obj.items()]}
    if isinstance(obj, (bytes, bytearray)):
        return {_TAG: "bytes", "v": base64.b64encode(bytes(obj)).decode("ascii")}
    if isinstance(obj, torch.dtype):
        return {_TAG: "dtype", "v": str(obj).removeprefix("torch.")}
    if isinstance(obj, torch.Tensor):
        raise StateMismatchError(
            f"tensor nested inside a non-tensor value at {where!r}; keep tensors in dicts"
        )
    raise StateMismatchError(
        f"cannot store the value at {where!r} safely: {type(obj).__name__} is not a tensor or JSON-like value. "
        "Convert it (e.g. to a dict of tensors/numbers/strings) or give it state_dict()/load_state_dict()."
    )


def _dec(obj: Any) -> Any:
    if isinstance(obj, list):
        return [_dec(x) for x in obj]
    if isinstance(obj, dict):
        tag = obj.get(_TAG)
        if tag is None:
            return {k: _dec(v) for k, v in obj.items()}
        v = obj.get("v")
        if tag == "float" and v in ("nan", "inf", "-inf"):
            return float(v)
        if tag == "size" and isinstance(v, list):
            return torch.Size(int(x) for x in v)
        if tag == "tuple" and isinstance(v, list):
            return tuple(_dec(x) for x in v)
        if tag == "dict" and isinstance(v, dict):
            return {k: _dec(x) for k, x in v.items()}
        if tag == "kdict" and isinstance(v, list):
            return {k: _dec(x) for k, x in v}
        if tag == "bytes" and isinstance(v, str):
            return base64.b64decode(v, validate=True)
        if tag == "dtype" and isinstance(v, str):
            return parse_dtype(v)
        raise ValueError(f"unknown tagged value {tag!r}")
    return obj


def encode_value(obj: Any, where: str = "?") -> bytes:
    """Encode a non-tensor value as UTF-8 JSON bytes; refuse anything that would need pickle."""
    return json.dumps(_enc(obj, where), separators=(",", ":"), allow_nan=False).encode()


def decode_value(data: bytes, where: str = "?") -> Any:
    """Decode what :func:`encode_value` wrote; anything else is a :class:`CorruptCheckpointError`."""
    if len(data) > MAX_BYTES:
        raise CorruptCheckpointError(f"non-tensor value {where!r} is {len(data)} bytes; refusing")
    if data[:1] in (b"\x80", b"P"):  # pickle protocol header or a zip (torch.save) archive
        from .errors import UnsafeCheckpointError

        raise UnsafeCheckpointError(
            f"value {where!r} is a pickle; ckptio never unpickles checkpoint data (it could run code)"
        )
    try:
        return _dec(json.loads(data.decode("utf-8")))
    except (ValueError, TypeError, UnicodeDecodeError, RecursionError) as exc:
        raise CorruptCheckpointError(f"value {where!r} is not valid ckptio JSON: {exc}") from exc


#: Quantized dtypes: their bytes mean nothing without the scale and zero point, which DCP's
#: metadata has no place for, so ckptio refuses to store them (see :func:`check_not_quantized`).
QUANTIZED_DTYPES = frozenset(
    getattr(torch, n)
    for n in ("qint8", "quint8", "qint32", "quint4x2", "quint2x4")
    if isinstance(getattr(torch, n, None), torch.dtype)
)

_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in dir(torch)
    if isinstance(getattr(torch, name, None), torch.dtype)
    and not name.startswith("_")
    and getattr(torch, name) not in QUANTIZED_DTYPES
}


def quantized_message(keys: list[str]) -> str:
    shown = ", ".join(keys[:10]) + (f", ... ({len(keys) - 10} more)" if len(keys) > 10 else "")
    return (
        f"quantized tensors cannot be saved (their scale and zero point would be lost): {shown}. "
        "Dequantize them (t.dequantize()), or save t.int_repr() with t.q_scale()/t.q_zero_point() "
        "(or q_per_channel_scales()/q_per_channel_zero_points()) as separate entries."
    )


def dtype_name(dtype: torch.dtype, key: str = "?") -> str:
    if dtype in QUANTIZED_DTYPES:
        raise StateMismatchError(quantized_message([key]), mismatched=[key])
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16``; unknown names are corrupt metadata, not a default.

    Quantized dtypes are unknown here: ckptio never writes them.
    """
    dt = _DTYPES.get(name.removeprefix("torch.")) if isinstance(name, str) else None
    if dt is None:
        raise CorruptCheckpointError(f"unknown dtype {name!r} in checkpoint metadata")
    return dt
