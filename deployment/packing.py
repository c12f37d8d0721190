"""Pack a message's arrays into one byte array, so Flower moves one object instead of hundreds.

Flower 1.42 stores and transfers every :class:`~flwr.app.Array` of a message as a separate
object, one HTTP request each; a U-Net's ~160 tensors then cost ~300 requests per node and
round, which on a small machine takes seconds. In deployment mode the ServerApp's grid
(:mod:`deployment.server_app`) and the ClientApp bridge (:mod:`deployment.bridge`) pack the
``arrays`` record into a single uint8 array on the way out and unpack it on the way in, so
strategies and trainers still see ``{name: ndarray}``.

Layout of a packed blob: 8-byte little-endian header length, JSON header
``[[name, dtype, shape, offset, nbytes], ...]``, then the raw array bytes.
"""
from __future__ import annotations

import json
from typing import Dict, List, Mapping, Tuple

import numpy as np

#: Key of the single array inside a packed ArrayRecord.
PACKED_KEY = "fedicra-packed-arrays"


def split_arrays(arrays: Mapping[str, np.ndarray]) -> Tuple[List[list], bytes]:
    """``{name: array}`` -> (index ``[name, dtype, shape, offset, nbytes]`` list, raw bytes)."""
    index, chunks, offset = [], [], 0
    for name, value in arrays.items():
        array = np.asarray(value)  # tobytes() writes C order; keeps 0-d arrays 0-d
        if array.dtype.hasobject:
            raise TypeError(f"array {name!r} has dtype object; only numeric arrays are packed")
        index.append([str(name), array.dtype.str, list(array.shape), offset, array.nbytes])
        chunks.append(array.tobytes())
        offset += array.nbytes
    return index, b"".join(chunks)


def join_arrays(index: List[list], buffer: bytes) -> Dict[str, np.ndarray]:
    """Inverse of :func:`split_arrays` (the arrays are writable copies)."""
    arrays = {}
    for name, dtype, shape, offset, nbytes in index:
        dt = np.dtype(dtype)
        flat = np.frombuffer(buffer, dtype=dt, count=nbytes // dt.itemsize, offset=offset)
        arrays[name] = flat.reshape(shape).copy()
    return arrays


def pack_arrays(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """``{name: array}`` -> one uint8 array holding names, dtypes, shapes and data."""
    index, buffer = split_arrays(arrays)
    header = json.dumps(index).encode()
    blob = len(header).to_bytes(8, "little") + header + buffer
    return np.frombuffer(blob, dtype=np.uint8)


def unpack_arrays(blob: np.ndarray) -> Dict[str, np.ndarray]:
    """Inverse of :func:`pack_arrays`."""
    raw = np.ascontiguousarray(blob, dtype=np.uint8).tobytes()
    size = int.from_bytes(raw[:8], "little")
    return join_arrays(json.loads(raw[8:8 + size].decode()), raw[8 + size:])


# ---------------------------------------------------------------------- Flower records
def pack_record(arrays: Mapping[str, np.ndarray]):
    """An ArrayRecord with the single packed array (empty stays empty)."""
    from flwr.app import Array, ArrayRecord

    if not arrays:
        return ArrayRecord()
    return ArrayRecord({PACKED_KEY: Array(pack_arrays(arrays))})


def record_arrays(record) -> Dict[str, np.ndarray]:
    """``{name: ndarray}`` of an ArrayRecord, packed or not."""
    if record is None:
        return {}
    if PACKED_KEY in record:
        return unpack_arrays(record[PACKED_KEY].numpy())
    return {k: v.numpy() for k, v in record.items()}


def is_packed(record) -> bool:
    return record is not None and PACKED_KEY in record


def pack_content(content):
    """A copy of RecordDict ``content`` whose ArrayRecords are packed (others kept as is)."""
    from flwr.app import RecordDict

    out = RecordDict()
    for key, record in content.items():
        if key in content.array_records and not is_packed(record):
            record = pack_record(record_arrays(record))
        out[key] = record
    return out


def unpack_content(content):
    """A copy of RecordDict ``content`` whose packed ArrayRecords are expanded again."""
    from flwr.app import Array, ArrayRecord, RecordDict

    out = RecordDict()
    for key, record in content.items():
        if key in content.array_records and is_packed(record):
            record = ArrayRecord({k: Array(v) for k, v in record_arrays(record).items()})
        out[key] = record
    return out
