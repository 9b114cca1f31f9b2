"""The seams under model experts, without a daemon: the array encoding and the model cache's pure parts."""

from __future__ import annotations

import os

import msgpack
import numpy as np
import pytest

from expertd import arrays, protocol
from expertd.modelcache import cache_directory, content_hash, entry_key, model_kind

ALL_DTYPES = sorted(arrays.DTYPES)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_every_accepted_dtype_round_trips_through_msgpack(dtype):
    array = (np.arange(24) % 2 if dtype == "bool" else np.arange(24)).astype(dtype).reshape(2, 3, 4)
    wire = protocol.unpack(protocol.pack(arrays.encode(array)))
    back = arrays.decode(wire)
    assert back.dtype == np.dtype(dtype) and back.shape == (2, 3, 4)
    np.testing.assert_array_equal(back, array)


def test_big_endian_and_strided_arrays_are_sent_as_little_endian_c_order():
    array = np.arange(12, dtype=">i4").reshape(3, 4).T  # neither little-endian nor C-contiguous
    name, shape, data = arrays.encode(array)[arrays.KEY]
    assert (name, shape) == ("int32", [4, 3])
    assert data == np.ascontiguousarray(array).astype("<i4").tobytes()
    np.testing.assert_array_equal(arrays.decode(arrays.encode(array)), array)


def test_encoding_is_plain_msgpack_with_no_extension_types():
    packed = msgpack.packb(arrays.encode(np.ones((2, 2), np.float32)), use_bin_type=True)
    assert msgpack.unpackb(packed, ext_hook=lambda code, data: pytest.fail("ext type used"))


@pytest.mark.parametrize(("value", "message"), [
    ({arrays.KEY: ["float32", [2], b"\0" * 4]}, "shape [2] of float32 needs 8 bytes, got 4"),
    ({arrays.KEY: ["object", [1], b"\0" * 8]}, "dtype 'object' is not accepted"),
    ({arrays.KEY: ["float32", [-1], b""]}, "shape must be a list of at most 32 non-negative integers"),
    ({arrays.KEY: ["float32", [1] * 33, b"\0" * 4]}, "shape must be a list of at most 32"),
    ({arrays.KEY: ["float32", [1], "text"]}, "the data part must be msgpack bin"),
    ({arrays.KEY: ["float32", [1]]}, "an encoded array is"),
    ({arrays.KEY: "float32"}, "an encoded array is"),
    ({arrays.KEY: [["float32"], [1], b"\0" * 4]}, "dtype ['float32'] is not accepted"),
])
def test_malformed_arrays_are_refused_with_one_line(value, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")) as refused:
        arrays.decode(value, "input 'x'")
    assert str(refused.value).startswith("input 'x': ") and "\n" not in str(refused.value)


def test_unsupported_dtypes_are_refused_when_sending():
    with pytest.raises(TypeError, match="arrays of dtype complex64 cannot be sent"):
        arrays.encode(np.zeros(2, np.complex64))


def test_the_client_encodes_numpy_without_importing_it():
    assert arrays.is_array(np.zeros(1)) and not arrays.is_array([0.0]) and not arrays.is_array(b"x")


@pytest.mark.parametrize(("setting", "environment", "expected"), [
    ("/srv/models", "/var/cache/expertd", "/srv/models"),
    ("", "/var/cache/expertd:/var/cache/other", "/var/cache/expertd"),
    ("", "", os.path.join(os.path.expanduser("~"), ".cache", "expertd")),
])
def test_cache_directory_is_the_setting_then_systemds_then_home(monkeypatch, setting, environment, expected):
    monkeypatch.setenv("CACHE_DIRECTORY", environment)
    assert cache_directory(setting) == expected


def test_model_kinds_by_suffix_and_directory(tmp_path):
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "saved_model.pb").write_bytes(b"")
    (tmp_path / "plain").mkdir()
    for name in ("a.keras", "b.h5", "c.tflite", "d.onnx"):
        (tmp_path / name).write_bytes(b"")
    assert [model_kind(str(tmp_path / n)) for n in ("a.keras", "b.h5", "c.tflite", "saved")] == [
        "keras", "keras", "tflite", "saved_model"]
    with pytest.raises(ValueError, match=r"unknown model format '\.onnx'"):
        model_kind(str(tmp_path / "d.onnx"))
    with pytest.raises(ValueError, match=r"directory without saved_model\.pb"):
        model_kind(str(tmp_path / "plain"))


def test_a_rewritten_model_gets_a_new_hash_even_with_its_size_and_mtime_kept(tmp_path):
    model, cache = tmp_path / "m.keras", tmp_path / "cache"
    model.write_bytes(b"A" * 1000)
    first = content_hash(str(model), str(cache))
    assert content_hash(str(model), str(cache)) == first  # remembered
    stat = model.stat()
    model.write_bytes(b"B" * 1000)
    os.utime(model, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size, same mtime: only ctime tells
    second = content_hash(str(model), str(cache))
    assert second != first and second == content_hash(str(model))


def test_entry_keys_change_with_the_content():
    assert entry_key("a" * 64) != entry_key("b" * 64)
    assert entry_key("a" * 64).startswith("a" * 32 + "-")
