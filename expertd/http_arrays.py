"""Raw array bodies over HTTP: a model expert's rows as bytes, its answer as bytes.

Owns no state.  ``POST /call/NAME`` with ``Content-Type: application/octet-stream``
sends a model expert's one input as raw little-endian bytes: whole rows of the
input's dtype and row shape (``float32[batch, 2048]``: 8,192 bytes a row), as
many rows as the body holds.  The answer is the model's one output the same
way, with its dtype and shape in ``X-Expertd-Dtype`` and ``X-Expertd-Shape``
(``float32``, ``1,2048``).  Errors stay JSON, as on every route.

Why: JSON spends tens of bytes and a float parse per number; a row of 2,048
floats is 42 KB of text, and its answer 40 KB, which the caller, the master
and the worker all handle.  Raw bytes are what Client.predict sends on the
socket (as msgpack), and what HTTP callers in other languages have at hand
(``numpy.tobytes()``, a ``Float32Array``'s buffer, ``curl --data-binary @rows.f32``).
"""

from __future__ import annotations

import math
from typing import Any

from expertd import arrays
from expertd.errors import BadRequest

OCTET_STREAM = "application/octet-stream"
_TYPE = OCTET_STREAM.encode()


def is_binary(content_type: bytes) -> bool:
    """Whether a request's Content-Type (its bytes as sent) is application/octet-stream."""
    return content_type.split(b";", 1)[0].strip().lower() == _TYPE


def call_arguments(body: bytes, expert: Any, name: str) -> tuple[list, dict]:
    """A model expert's arguments from a raw body: ``[rows], {"arrays": True}``; BadRequest if it cannot be."""
    model = getattr(getattr(expert, "function", None), "__expertd_model__", None)
    if model is None:
        raise BadRequest(f"{name} is not a model expert: an {OCTET_STREAM} body is rows of a model's input; "
                         "send JSON (Content-Type: application/json)", expert=name)
    inputs, outputs = model.inputs, model.outputs
    if len(inputs) != 1 or len(outputs) != 1:
        raise BadRequest(f"{name} has {_count(inputs, 'input')} and {_count(outputs, 'output')}: an {OCTET_STREAM} "
                         "body carries one input and its answer one output; send JSON", expert=name)
    spec = inputs[0]
    for what in (spec, outputs[0]):
        if what["dtype"] not in arrays.DTYPES:
            raise BadRequest(f"{name}: {what['name']!r} is {arrays.describe_spec(what)}, which raw bytes cannot carry; "
                             "send JSON", expert=name)
    row = [int(d) for d in spec["shape"][1:]]
    if any(d < 0 for d in row):
        raise BadRequest(f"{name}: input {spec['name']!r} is {arrays.describe_spec(spec)}, whose rows have no "
                         "fixed size; send JSON", expert=name)
    import numpy as np  # (only here: a daemon that serves no model never loads it for HTTP)

    dtype = np.dtype(spec["dtype"]).newbyteorder("<")
    row_bytes = dtype.itemsize * math.prod(row)
    if row_bytes == 0 or len(body) % row_bytes:
        raise BadRequest(f"{name}: the body is {len(body)} bytes, not whole rows of {arrays.describe_spec(spec)} "
                         f"({row_bytes} bytes each, little-endian)", expert=name)
    rows = np.frombuffer(body, dtype=dtype).reshape(len(body) // row_bytes, *row)
    return [rows], {"arrays": True}


def reply(result: Any) -> tuple[bytes, tuple[tuple[str, str], ...]]:
    """The body and headers of a raw answer from a model expert's encoded output (``arrays=True``)."""
    if not arrays.is_encoded(result):  # (one output, checked before the call: this is the model's own answer)
        raise TypeError("a model expert answered with something other than one array")
    dtype, shape, data = result[arrays.KEY]
    return bytes(data), (("X-Expertd-Dtype", dtype), ("X-Expertd-Shape", ",".join(str(d) for d in shape)))


def _count(specs: list, what: str) -> str:
    return f"{len(specs)} {what}{'' if len(specs) == 1 else 's'}"
