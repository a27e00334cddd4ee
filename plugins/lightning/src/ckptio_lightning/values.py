"""Lightning's checkpoint dict <-> what ckptio stores: tensors, and one JSON value.

A Lightning checkpoint mixes tensors (weights, optimizer moments, ``best_model_score``) with
plain values (epoch, loop progress, hyper-parameters, callback state) at every depth, in dicts
with ``int`` keys (``optimizer_states[i]["state"][0]``), in tuples (``betas``), in empty dicts
(``loops["fit_loop"]["state_dict"]``). DCP's flattening would lose some of that (it turns keys
into strings and drops empty dicts), so the split is done here, explicitly:

* every tensor becomes one flat entry of the saved state, named by its path in the checkpoint
  joined with dots (``state_dict.layer.weight``, ``optimizer_states.0.state.0.exp_avg``), which
  is what ``ckptio inspect`` shows;
* everything else, with a reference in place of each tensor, is one JSON value (``__lightning__``)
  that ckptio stores with its tagged types: tuples stay tuples, ``int`` keys stay ``int``, empty
  dicts stay, ``bytes``, ``torch.dtype``, ``torch.Size`` and non-finite floats come back as they
  were. ``OrderedDict`` stays an ``OrderedDict``, and a ``state_dict``'s ``_metadata`` (module
  versions) is kept. Other ``Mapping`` types (Lightning's ``AttributeDict`` hyper-parameters)
  come back as ``dict``; NumPy scalars come back as Python numbers.

Anything else (a tokenizer, a ``Path``, an ``Enum``, a NumPy array, a class) is refused before a
byte is written, with the key that holds it: ckptio never pickles, so loading a checkpoint can
never run code.
"""

from __future__ import annotations

import enum
import sys
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from ckptio.errors import CorruptCheckpointError, StateMismatchError

#: The saved state's entry holding the non-tensor structure.
STATE_KEY = "__lightning__"
#: Version of the layout below; a newer one is refused with a clear error.
LAYOUT_VERSION = 1
_TENSOR = "__ckptio_tensor__"  # {_TENSOR: key}: the tensor saved under ``key``
_DICT = "__ckptio_dict__"  # {_DICT: {...}, "ordered": bool, "metadata": ...}: a dict with extras
_MAX_DEPTH = 200

ALLOWED = (
    "tensors and JSON values only (None, bool, int, float, str, bytes, torch.dtype, torch.Size, and "
    "lists, tuples and dicts with str or int keys of those), never a pickle"
)


def where(path: tuple[Any, ...]) -> str:
    """``checkpoint['hyper_parameters']['tokenizer']``: how a message names a value."""
    return "checkpoint" + "".join(f"[{p!r}]" for p in path)


def _refuse(path: tuple[Any, ...], what: str, hint: str = "") -> StateMismatchError:
    key = where(path)
    return StateMismatchError(
        f"{key} is {what}: ckptio stores {ALLOWED}. "
        + (
            hint
            or "Convert it to one of those before saving (in LightningModule.on_save_checkpoint or the "
            "callback's state_dict), or keep it out of the checkpoint "
            "(e.g. self.save_hyperparameters(ignore=[...]))."
        ),
        mismatched=[key],
    )


def _article(obj: Any) -> str:
    name = type(obj).__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name} object"


def split(checkpoint: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, skeleton)``: the flat tensors to save and the JSON-able rest."""
    tensors: dict[str, torch.Tensor] = {}
    used = {STATE_KEY}

    def tensor_key(path: tuple[Any, ...]) -> str:
        base = ".".join(str(p) for p in path) or "tensor"
        key, n = base, 1
        while key in used:  # {"a.b": t} and {"a": {"b": t}}, or 0 and "0": still two entries
            n += 1
            key = f"{base}#{n}"
        used.add(key)
        return key

    def enc(obj: Any, path: tuple[Any, ...]) -> Any:
        if len(path) > _MAX_DEPTH:
            raise _refuse(path, f"nested more than {_MAX_DEPTH} levels deep")
        if isinstance(obj, torch.Tensor):
            if type(obj) is not torch.Tensor and not isinstance(obj, torch.nn.Parameter):
                # DTensor and other subclasses: ckptio saves them, but not inside this layout
                raise _refuse(
                    path,
                    f"a {type(obj).__name__}",
                    "Lightning's CheckpointIO receives a full state dict on rank 0; gather it first "
                    "(e.g. FSDPStrategy(state_dict_type='full')).",
                )
            key = tensor_key(path)
            tensors[key] = obj.detach()
            return {_TENSOR: key}
        if isinstance(obj, enum.Enum):
            raise _refuse(path, f"an enum member ({obj!r})", "Store its .value (or .name) instead.")
        if obj is None or isinstance(obj, bool):
            return obj
        if isinstance(obj, str):
            return str.__str__(obj)
        if isinstance(obj, int):
            return int.__index__(obj)
        if isinstance(obj, float):
            return float(obj)
        if _is_numpy_scalar(obj):
            return enc(obj.item(), path)  # np.float32, np.int64, np.bool_: as Python numbers
        if isinstance(obj, (bytes, bytearray)):
            return bytes(obj)
        if isinstance(obj, (torch.dtype, torch.Size)):
            return obj
        if type(obj) is tuple:
            return tuple(enc(x, (*path, i)) for i, x in enumerate(obj))
        if type(obj) is list:
            return [enc(x, (*path, i)) for i, x in enumerate(obj)]
        if isinstance(obj, Mapping):
            out: dict[Any, Any] = {}
            for k, v in obj.items():
                if isinstance(k, bool) or not isinstance(k, (str, int)):
                    raise _refuse(
                        (*path, k),
                        f"under a key of type {type(k).__name__}",
                        "Dict keys must be str or int; convert the key (e.g. str(key)).",
                    )
                if isinstance(k, enum.Enum):
                    raise _refuse((*path, k), "under an enum key", "Use its .value (or .name) as the key.")
                out[k] = enc(v, (*path, k))
            meta = getattr(obj, "_metadata", None)
            if isinstance(obj, OrderedDict) or isinstance(meta, dict) or _TENSOR in out or _DICT in out:
                wrapped: dict[str, Any] = {_DICT: out, "ordered": isinstance(obj, OrderedDict)}
                if isinstance(meta, dict):  # a module state_dict's versions (BatchNorm...)
                    wrapped["metadata"] = enc(meta, (*path, "_metadata"))
                return wrapped
            return out
        if isinstance(obj, tuple):
            raise _refuse(
                path, f"a named tuple ({type(obj).__name__})", "Store it as a dict (obj._asdict())."
            )
        raise _refuse(path, _article(obj))

    top = enc(checkpoint, ())
    return tensors, {"layout": LAYOUT_VERSION, "checkpoint": top}


def _is_numpy_scalar(obj: Any) -> bool:
    np = sys.modules.get("numpy")  # never imported here: a NumPy value means NumPy is loaded
    return np is not None and isinstance(obj, np.generic) and not isinstance(obj, (np.ndarray, np.void))


def join(skeleton: Any, tensors: Mapping[str, torch.Tensor], url: str) -> dict[str, Any]:
    """The checkpoint dict :func:`split` was given, from what ckptio read back."""
    if not isinstance(skeleton, dict) or "checkpoint" not in skeleton:
        raise CorruptCheckpointError(f"{url}: its {STATE_KEY!r} entry is malformed", path=url)
    layout = skeleton.get("layout")
    if layout != LAYOUT_VERSION:
        raise CorruptCheckpointError(
            f"{url} was written with layout {layout!r} of ckptio-lightning; this version reads "
            f"layout {LAYOUT_VERSION}: upgrade ckptio-lightning",
            path=url,
        )

    def dec(obj: Any, depth: int) -> Any:
        if depth > _MAX_DEPTH + 2:
            raise CorruptCheckpointError(f"{url}: its {STATE_KEY!r} entry is nested too deep", path=url)
        if isinstance(obj, dict):
            if _TENSOR in obj and len(obj) == 1:
                key = obj[_TENSOR]
                t = tensors.get(key) if isinstance(key, str) else None
                if t is None:
                    raise CorruptCheckpointError(f"{url}: tensor {key!r} is missing", path=url)
                return t
            if _DICT in obj:
                inner = obj[_DICT]
                if not isinstance(inner, dict):
                    raise CorruptCheckpointError(f"{url}: its {STATE_KEY!r} entry is malformed", path=url)
                out: dict[Any, Any] = (OrderedDict if obj.get("ordered") else dict)(
                    (k, dec(v, depth + 1)) for k, v in inner.items()
                )
                if isinstance(obj.get("metadata"), dict):
                    out._metadata = dec(obj["metadata"], depth + 1)  # type: ignore[attr-defined]
                return out
            return {k: dec(v, depth + 1) for k, v in obj.items()}
        if isinstance(obj, list):
            return [dec(x, depth + 1) for x in obj]
        if isinstance(obj, tuple) and not isinstance(obj, torch.Size):
            return tuple(dec(x, depth + 1) for x in obj)
        return obj

    out = dec(skeleton["checkpoint"], 0)
    if not isinstance(out, dict):
        raise CorruptCheckpointError(f"{url}: its {STATE_KEY!r} entry is not a checkpoint dict", path=url)
    return out
