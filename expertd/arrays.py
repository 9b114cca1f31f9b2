"""Numeric arrays on the wire: dtype + shape + raw bytes, in plain msgpack (spec: docs/protocol.md).

An array travels as a msgpack map with one key::

    {"$ndarray": [DTYPE, SHAPE, DATA]}

DTYPE is one of :data:`DTYPES` (numpy's names; data is little-endian), SHAPE a
list of non-negative integers, DATA a msgpack bin holding the elements in C
order.  It is plain msgpack: no extension type, nothing pickled, nothing that
names a Python class.  A receiver decodes it only where it expects an array (a
model expert's inputs, a reply the caller asked to get as arrays); anywhere
else it is an ordinary one-key map.  A 64 MiB float32 batch costs one copy
each way instead of the tens of bytes per number that nested lists cost.

Shared by client and server: :func:`encode` needs nothing but the array's own
methods; :func:`decode` imports numpy only when it runs (the client never
calls it unless the caller asked for arrays, so it has numpy already).
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

KEY = "$ndarray"
DTYPES = frozenset({
    "bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
    "float16", "float32", "float64",
})
MAX_DIMENSIONS = 32  # numpy's own limit is 64; no model input has more than a handful


def is_array(value: object) -> bool:
    """Whether ``value`` is a numpy-like array that :func:`encode` accepts (duck-typed: no numpy import)."""
    return hasattr(value, "__array_interface__") and hasattr(value, "tobytes") and hasattr(value, "dtype")


def is_encoded(value: object) -> bool:
    """Whether a decoded msgpack value is an encoded array."""
    return type(value) is dict and len(value) == 1 and KEY in value


def encode(array: Any) -> dict:
    """The wire form of a numpy array (any dtype in :data:`DTYPES`, any byte order, any strides)."""
    dtype = array.dtype
    name = _names.get(dtype)
    if name is None:  # (dtype.name costs microseconds: each dtype's is worked out once)
        name = _names[dtype] = dtype.name
        if name not in DTYPES:
            del _names[dtype]
            raise TypeError(f"arrays of dtype {name} cannot be sent; use one of {', '.join(sorted(DTYPES))}")
    if dtype.byteorder == ">":
        array = array.astype(dtype.newbyteorder("<"))
    return {KEY: [name, list(array.shape), array.tobytes(order="C")]}


_names: dict = {}


def decode(value: Any, where: str = "array") -> Any:
    """The numpy array (read-only, no copy) that an encoded map stands for.

    Raises ValueError with a one-line message naming ``where`` when the map is
    malformed: wrong parts, an unknown dtype, or a byte count that does not
    match the shape.
    """
    parts = value.get(KEY) if type(value) is dict else None
    if not (type(parts) is list and len(parts) == 3):
        raise ValueError(f"{where}: an encoded array is {{{KEY!r}: [dtype, shape, bytes]}}")
    dtype, shape, data = parts
    if type(dtype) is not str or dtype not in DTYPES:
        raise ValueError(f"{where}: dtype {dtype!r} is not accepted; use one of {', '.join(sorted(DTYPES))}")
    if (type(shape) is not list or len(shape) > MAX_DIMENSIONS
            or not all(type(d) is int and 0 <= d < 2**40 for d in shape)):
        raise ValueError(f"{where}: shape must be a list of at most {MAX_DIMENSIONS} non-negative integers")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"{where}: the data part must be msgpack bin (bytes)")
    np_dtype = _dtypes.get(dtype)
    if np_dtype is None:
        import numpy

        np_dtype = _dtypes[dtype] = numpy.dtype(dtype).newbyteorder("<")
    count = 1
    for dimension in shape:
        count *= dimension
    if count * np_dtype.itemsize != len(data):
        raise ValueError(
            f"{where}: shape {shape} of {dtype} needs {count * np_dtype.itemsize} bytes, got {len(data)}"
        )
    return _frombuffer(data, np_dtype).reshape(shape)


_dtypes: dict = {}


def _frombuffer(data: Any, dtype: Any) -> Any:
    import numpy

    return numpy.frombuffer(data, dtype=dtype)


def decode_tree(value: Any) -> Any:
    """``value`` with every encoded array in it (top level, or in a dict or list) decoded."""
    if is_encoded(value):
        return decode(value)
    if isinstance(value, dict):
        return {key: decode_tree(item) for key, item in value.items()}
    if isinstance(value, list):
        return [decode_tree(item) for item in value]
    return value


def describe_spec(spec: dict[str, Any]) -> str:
    """An input's or output's dtype and shape as errors and listings show them: ``float32[batch, 8]``."""
    dims = ", ".join("batch" if i == 0 else ("*" if d < 0 else str(d)) for i, d in enumerate(spec["shape"]))
    return f"{spec['dtype']}[{dims}]"
