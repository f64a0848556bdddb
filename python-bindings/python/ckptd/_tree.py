"""Flattening a training state into tensors plus typed metadata, and back.

A state is a tree of dicts, lists and tuples whose dict keys are ``str`` or ``int``. Its leaves are
tensors (torch, numpy, or anything with ``__dlpack__`` or ``__array_interface__``), which are
saved as raw bytes under their key path, and Python scalars (``None``, ``bool``, ``int``,
``float``, ``str``, ``bytes``), which are saved as typed JSON in the shard's user metadata.
Nothing is pickled.

Key paths: the keys from the root to a leaf, joined by ``/``. An ``int`` key (a dict key or a
list/tuple index) is written ``#<n>`` (``#0``, ``#-1``); a ``str`` key is written as is, except
that ``~`` becomes ``~0``, ``/`` becomes ``~1``, ``#`` becomes ``~2``, and the empty string is
written ``~``. So ``{"opt": {"state": {0: {"exp_avg": t}}}}`` names ``t``
``opt/state/#0/exp_avg``, the ``str`` key ``"0"`` stays ``0``, and dots (``layer.0.weight``) are
kept as they are.
"""

from __future__ import annotations

import base64
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from . import _native

Key = str | int
Scalar = None | bool | int | float | str | bytes

#: Identifies the metadata this module writes, and its version.
METADATA_FORMAT: Final = "ckptd-state"
METADATA_VERSION: Final = 1

#: Element types the format stores, by torch name.
DTYPES: Final = frozenset(
    {
        "float64",
        "float32",
        "float16",
        "bfloat16",
        "float8_e4m3fn",
        "float8_e5m2",
        "int64",
        "int32",
        "int16",
        "int8",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "bool",
        "complex64",
        "complex128",
    }
)

#: Bytes per element of each stored dtype.
ITEMSIZE: Final = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "uint16": 2,
    "uint32": 4,
    "uint64": 8,
    "bool": 1,
    "complex64": 8,
    "complex128": 16,
}

_NUMPY_KINDS: Final = {
    ("f", 8): "float64",
    ("f", 4): "float32",
    ("f", 2): "float16",
    ("i", 8): "int64",
    ("i", 4): "int32",
    ("i", 2): "int16",
    ("i", 1): "int8",
    ("u", 8): "uint64",
    ("u", 4): "uint32",
    ("u", 2): "uint16",
    ("u", 1): "uint8",
    ("b", 1): "bool",
    ("c", 16): "complex128",
    ("c", 8): "complex64",
}

# DLPack device types.
_DL_CPU: Final = 1
_DL_CUDA: Final = 2
_DL_CUDA_HOST: Final = 3


def encode_key(key: Key) -> str:
    """One path segment for ``key`` (see the module documentation)."""
    if isinstance(key, bool) or not isinstance(key, (str, int)):
        raise TypeError(f"unsupported key {key!r}")
    if isinstance(key, int):
        return f"#{key}"
    if key == "":
        return "~"
    return key.replace("~", "~0").replace("/", "~1").replace("#", "~2")


def decode_key(segment: str) -> Key:
    """The key that :func:`encode_key` wrote as ``segment``."""
    if segment.startswith("#"):
        return int(segment[1:])
    if segment == "~":
        return ""
    return segment.replace("~2", "#").replace("~1", "/").replace("~0", "~")


def join(path: str, key: Key) -> str:
    """The key path of ``key`` under ``path``."""
    seg = encode_key(key)
    return seg if path == "" else f"{path}/{seg}"


def split(name: str) -> list[Key]:
    """The keys of key path ``name``."""
    return [decode_key(s) for s in name.split("/")]


@dataclass(frozen=True)
class TensorInfo:
    """A stored tensor's element type (torch name) and shape."""

    dtype: str
    shape: tuple[int, ...]


@dataclass
class Leaf:
    """A tensor leaf ready for the native module, and the object that owns its memory."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    addr: int
    device: int
    owner: object

    def as_tuple(self) -> tuple[str, str, tuple[int, ...], int, int]:
        return (self.name, self.dtype, self.shape, self.addr, self.device)

    def snapshot(self) -> Leaf:
        """This leaf with its data copied now (torch: in stream order on its device), so that
        later writes to the original do not reach what the copy engine reads."""
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(self.owner, torch.Tensor):
            copy = self.owner.detach().clone(memory_format=torch.contiguous_format)
            return Leaf(self.name, self.dtype, self.shape, int(copy.data_ptr()), self.device, copy)
        copied = self.owner.copy()  # type: ignore[attr-defined]
        addr = int(copied.__array_interface__["data"][0])
        return Leaf(self.name, self.dtype, self.shape, addr, self.device, copied)


@dataclass
class Flat:
    """A flattened state: its tensors, its scalars by key path, and its shape as JSON."""

    tensors: list[Leaf]
    scalars: dict[str, Scalar]
    tree: Any


def _config_error(msg: str) -> Exception:
    err: Exception = _native.ConfigError(msg)
    return err


def _torch_leaf(t: Any, name: str, writable: bool) -> Leaf:
    if t.layout is not sys.modules["torch"].strided:
        raise _config_error(f"`{name}`: a {t.layout} tensor is not supported: convert it with .to_dense()")
    if t.is_conj() or t.is_neg():
        raise _config_error(f"`{name}`: a lazily conjugated or negated tensor: call .resolve_conj().resolve_neg()")
    dev = t.device
    if dev.type == "cpu":
        device = -1
    elif dev.type == "cuda":
        device = int(dev.index if dev.index is not None else 0)
    else:
        raise _config_error(f"`{name}`: tensors on device `{dev}` are not supported (only cpu and cuda)")
    dtype = str(t.dtype).removeprefix("torch.")
    if dtype not in DTYPES:
        raise _config_error(f"`{name}`: dtype {dtype} is not supported (supported: {', '.join(sorted(DTYPES))})")
    if not t.is_contiguous():
        raise _config_error(
            f"`{name}`: the tensor is not contiguous (shape {tuple(t.shape)}, strides {t.stride()}): "
            "save a .contiguous() copy"
        )
    del writable  # torch tensors are always writable memory
    return Leaf(name, dtype, tuple(int(d) for d in t.shape), int(t.data_ptr()), device, t)


def _numpy_leaf(a: Any, name: str, writable: bool) -> Leaf:
    dt = a.dtype
    dtype = _NUMPY_KINDS.get((dt.kind, dt.itemsize))
    if dtype is None and dt.name in DTYPES:  # ml_dtypes: bfloat16, float8_e4m3fn, float8_e5m2
        dtype = dt.name
    if dtype is None:
        raise _config_error(f"`{name}`: numpy dtype {dt} is not supported (supported: {', '.join(sorted(DTYPES))})")
    if dt.byteorder == ">" or (dt.byteorder == "=" and sys.byteorder == "big"):
        raise _config_error(f"`{name}`: big-endian arrays are not supported: use .astype(dtype.newbyteorder('<'))")
    if not a.flags.c_contiguous:
        raise _config_error(
            f"`{name}`: the array is not C-contiguous (shape {a.shape}, strides {a.strides}): "
            "save numpy.ascontiguousarray(...) instead"
        )
    if writable and not a.flags.writeable:
        raise _config_error(f"`{name}`: the array is read-only and cannot be loaded into")
    addr = int(a.__array_interface__["data"][0])
    return Leaf(name, dtype, tuple(int(d) for d in a.shape), addr, -1, a)


def _tensor_leaf(obj: Any, name: str, writable: bool) -> Leaf | None:
    """The tensor leaf for ``obj``, or ``None`` when it is no tensor."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.Tensor):
        return _torch_leaf(obj, name, writable)
    np = sys.modules.get("numpy")
    if np is not None and isinstance(obj, np.ndarray):
        return _numpy_leaf(obj, name, writable)
    if np is not None and isinstance(obj, np.generic):
        # Immutable: it could be saved but never loaded into.
        raise _config_error(
            f"`{name}`: a numpy scalar ({type(obj).__name__}) is not supported: use a Python scalar "
            "(.item()) or a 0-d array"
        )
    if hasattr(obj, "__dlpack__") and hasattr(obj, "__dlpack_device__"):
        dev_type = int(obj.__dlpack_device__()[0])
        if dev_type in (_DL_CPU, _DL_CUDA_HOST):
            try:
                import numpy
            except ImportError:
                numpy = None  # type: ignore[assignment]
            if numpy is not None:
                # Shares memory with `obj`: an in-place load fills `obj` itself.
                return _numpy_leaf(numpy.from_dlpack(obj), name, writable)
        if dev_type == _DL_CUDA or torch is not None:
            try:
                from torch.utils.dlpack import from_dlpack
            except ImportError:
                raise _config_error(f"`{name}`: a DLPack tensor on device type {dev_type} needs torch") from None
            return _torch_leaf(from_dlpack(obj), name, writable)
        raise _config_error(f"`{name}`: a DLPack tensor on device type {dev_type} needs numpy or torch")
    if hasattr(obj, "__array_interface__"):
        try:
            import numpy
        except ImportError:
            raise _config_error(f"`{name}`: an __array_interface__ object needs numpy") from None
        arr = numpy.asarray(obj)
        if writable and arr.__array_interface__["data"][0] != obj.__array_interface__["data"][0]:
            raise _config_error(f"`{name}`: its __array_interface__ does not expose its own memory to load into")
        return _numpy_leaf(arr, name, writable)
    return None


def _scalar_node(value: Scalar) -> dict[str, Any]:
    if value is None:
        return {"N": 0}
    if isinstance(value, bool):
        return {"B": value}
    if isinstance(value, int):
        return {"I": int(value)}
    if isinstance(value, float):
        return {"F": float(value).hex()}
    if isinstance(value, str):
        return {"S": str(value)}
    return {"Y": base64.b64encode(bytes(value)).decode("ascii")}


def _scalar_value(node: dict[str, Any]) -> Scalar:
    if "N" in node:
        return None
    if "B" in node:
        return bool(node["B"])
    if "I" in node:
        return int(node["I"])
    if "F" in node:
        return float.fromhex(node["F"])
    if "S" in node:
        return str(node["S"])
    return base64.b64decode(node["Y"])


_SCALARS: Final = (type(None), bool, int, float, str, bytes)


def flatten(state: Any, *, writable: bool) -> Flat:
    """Flattens ``state``; ``writable`` when it is to be loaded into."""
    if not isinstance(state, (dict, list)):
        raise _config_error(f"the state must be a dict or a list, not {type(state).__name__}")
    tensors: list[Leaf] = []
    scalars: dict[str, Scalar] = {}

    def walk(obj: Any, name: str, seen: tuple[int, ...]) -> Any:
        if isinstance(obj, _SCALARS):
            scalars[name] = obj
            return _scalar_node(obj)
        if isinstance(obj, (dict, list, tuple)):
            if id(obj) in seen:
                raise _config_error(f"`{name or '<root>'}`: the state contains itself")
            inner = (*seen, id(obj))
            if isinstance(obj, dict):
                items = []
                for k, v in obj.items():
                    if isinstance(k, bool) or not isinstance(k, (str, int)):
                        raise _config_error(
                            f"`{name or '<root>'}`: key {k!r} of type {type(k).__name__} is not supported "
                            "(keys must be str or int)"
                        )
                    items.append([k, walk(v, join(name, k), inner)])
                return {"D": items}
            nodes = [walk(v, join(name, i), inner) for i, v in enumerate(obj)]
            return {"U": nodes} if isinstance(obj, tuple) else {"L": nodes}
        leaf = _tensor_leaf(obj, name, writable)
        if leaf is None:
            raise _config_error(
                f"`{name}`: a leaf of type {type(obj).__module__}.{type(obj).__qualname__} is not supported: "
                "use tensors, numpy arrays, DLPack objects, or None, bool, int, float, str, bytes"
            )
        tensors.append(leaf)
        return {"T": 0}

    tree = walk(state, "", ())
    return Flat(tensors, scalars, tree)


def encode_metadata(flat: Flat) -> bytes:
    """The shard metadata for ``flat``: its tree with scalars inline."""
    doc = {"format": METADATA_FORMAT, "version": METADATA_VERSION, "tree": flat.tree}
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def decode_metadata(raw: bytes) -> Any:
    """The tree stored in ``raw``, or ``None`` when the shard holds no ckptd state metadata."""
    if not raw:
        return None
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(doc, dict) or doc.get("format") != METADATA_FORMAT:
        return None
    version = doc.get("version")
    if version != METADATA_VERSION:
        raise _native.CkptError(
            f"the checkpoint's state metadata has version {version}; this ckptd reads version "
            f"{METADATA_VERSION}: upgrade ckptd"
        )
    return doc["tree"]


def scalar_kind(value: Scalar) -> str:
    """How a scalar's type is named in messages (``int``, ``NoneType``)."""
    return type(value).__name__


def assign_scalars(state: Any, values: dict[str, Scalar]) -> Any:
    """Sets every scalar leaf of ``state`` to its entry in ``values`` (leaving those without
    one), in place for dicts and lists; tuples are rebuilt and stored back into their parent.
    Returns the (possibly new) root."""

    def walk(obj: Any, name: str) -> Any:
        if isinstance(obj, _SCALARS):
            return values.get(name, obj)
        if isinstance(obj, dict):
            for k in list(obj.keys()):
                new = walk(obj[k], join(name, k))
                if new is not obj[k]:
                    obj[k] = new
            return obj
        if isinstance(obj, list):
            for i, v in enumerate(obj):
                new = walk(v, join(name, i))
                if new is not v:
                    obj[i] = new
            return obj
        if isinstance(obj, tuple):
            items = [walk(v, join(name, i)) for i, v in enumerate(obj)]
            if all(a is b for a, b in zip(items, obj, strict=True)):
                return obj
            if hasattr(obj, "_fields"):  # a namedtuple
                return type(obj)(*items)
            return type(obj)(items) if type(obj) is not tuple else tuple(items)
        return obj

    return walk(state, "")


def build(tree: Any, tensors: dict[str, TensorInfo], make: Callable[[str, TensorInfo], Any]) -> Any:
    """The state a stored tree describes, with ``make(name, info)`` at each tensor leaf."""

    def walk(node: Any, name: str) -> Any:
        if "D" in node:
            return {k: walk(child, join(name, k)) for k, child in node["D"]}
        if "L" in node:
            return [walk(child, join(name, i)) for i, child in enumerate(node["L"])]
        if "U" in node:
            return tuple(walk(child, join(name, i)) for i, child in enumerate(node["U"]))
        if "T" in node:
            info = tensors.get(name)
            if info is None:
                raise _native.CorruptCheckpoint(
                    f"the checkpoint's state metadata names tensor `{name}`, which its tensor table lacks"
                )
            return make(name, info)
        return _scalar_value(node)

    return walk(tree, "")


def materialize(value: Any, make: Callable[[str, TensorInfo], Any], name: str) -> Any:
    """A copy of a described state ``value`` (found at key path ``name``) whose
    :class:`TensorInfo` leaves are replaced by ``make(name, info)``."""
    if isinstance(value, TensorInfo):
        return make(name, value)
    if isinstance(value, dict):
        return {k: materialize(v, make, join(name, k)) for k, v in value.items()}
    if isinstance(value, list):
        return [materialize(v, make, join(name, i)) for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return tuple(materialize(v, make, join(name, i)) for i, v in enumerate(value))
    return value


def described_leaves(value: Any, name: str) -> tuple[dict[str, TensorInfo], dict[str, Scalar]]:
    """The tensors and the scalars (by key path) of a described state ``value`` found at key path
    ``name``."""
    tensors: dict[str, TensorInfo] = {}
    scalars: dict[str, Scalar] = {}

    def walk(v: Any, n: str) -> None:
        if isinstance(v, TensorInfo):
            tensors[n] = v
        elif isinstance(v, dict):
            for k, child in v.items():
                walk(child, join(n, k))
        elif isinstance(v, (list, tuple)):
            for i, child in enumerate(v):
                walk(child, join(n, i))
        else:
            scalars[n] = v

    walk(value, name)
    return tensors, scalars


def described_scalars(value: Any) -> dict[str, Scalar]:
    """The scalars of a described state (from the root), by key path."""
    return described_leaves(value, "")[1]
