"""The Open Inference Protocol (KServe V2) infer body: tensors in and out, as JSON and with the binary data extension.

A request body is JSON, or, with the binary tensor data extension, JSON followed by raw tensor bytes; the header
`Inference-Header-Content-Length` gives the JSON's length, and each input whose `parameters.binary_data_size` is set
takes that many bytes of the rest, in order. Tensors are row-major; BYTES elements are each a 4-byte little-endian
length and the bytes (in JSON, a base64 string each, since encoded images are not text). Responses use the same
layout: outputs are written binary when the request asks (`parameters.binary_data_output`, or an output's
`parameters.binary_data`), as Triton's client library does by default. An output may ask for Triton's
classification extension (`parameters.classification: k`): its k largest values as BYTES "value:index:label".

Everything here works on bytes and numpy arrays, without HTTP; every malformed body raises `ProtocolError` with a
one-line reason, and nothing is allocated before the sizes it implies are checked against the body.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

HEADER_LENGTH = "Inference-Header-Content-Length"  # the binary tensor data extension's header

# KServe V2 datatypes with a fixed element size (BYTES is variable: length-prefixed elements)
DTYPES = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}


class ProtocolError(ValueError):
    """A request body that does not follow the protocol; the message is the one-line reason sent back."""


@dataclass
class Tensor:
    """One named tensor of a request or response.

    Attributes:
        name: the tensor's name.
        datatype: a KServe V2 datatype ("FP32", "BYTES", ...).
        shape: its shape.
        data: a numpy array of that shape, or for BYTES a flat list of byte strings.
        parameters: the tensor's parameters as the request gave them.
    """

    name: str
    datatype: str
    shape: list[int]
    data: np.ndarray | list[bytes]
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class InferRequest:
    """A parsed infer request: its inputs, the outputs it asks for ({name: parameters}, empty for all), its
    parameters and id."""

    inputs: list[Tensor]
    outputs: dict[str, dict[str, Any]]
    parameters: dict[str, Any]
    id: str | None = None


def _object(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} must be a JSON object, not {type(value).__name__}")
    return value


def _shape(value: Any, name: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value):
        raise ProtocolError(f"input {name!r}: shape must be a list of non-negative integers, not {value!r}")
    return value


def _split_bytes_elements(raw: bytes | memoryview, count: int, name: str) -> list[bytes]:
    """BYTES tensor data (each element a 4-byte little-endian length, then the bytes) -> `count` byte strings."""
    items, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise ProtocolError(f"input {name!r}: BYTES data ends inside an element's 4-byte length")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise ProtocolError(f"input {name!r}: a BYTES element of {length} bytes runs past the data")
        items.append(bytes(raw[offset : offset + length]))
        offset += length
    if len(items) != count:
        raise ProtocolError(f"input {name!r}: shape holds {count} elements, the BYTES data {len(items)}")
    return items


def _from_binary(raw: memoryview, datatype: str, shape: list[int], name: str) -> np.ndarray | list[bytes]:
    count = math.prod(shape)
    if datatype == "BYTES":
        return _split_bytes_elements(raw, count, name)
    itemsize = np.dtype(DTYPES[datatype]).itemsize
    if len(raw) != count * itemsize:
        raise ProtocolError(
            f"input {name!r}: {datatype} {shape} needs {count * itemsize} bytes, the request has {len(raw)}"
        )
    return np.frombuffer(raw, dtype=DTYPES[datatype]).reshape(shape)


def _flatten(data: Any) -> list[Any]:
    """Nested JSON lists -> one flat list (the protocol allows both)."""
    if not isinstance(data, list):
        return [data]
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def _from_json(data: Any, datatype: str, shape: list[int], name: str) -> np.ndarray | list[bytes]:
    flat = _flatten(data)
    count = math.prod(shape)
    if len(flat) != count:
        raise ProtocolError(f"input {name!r}: shape {shape} holds {count} elements, data has {len(flat)}")
    if datatype == "BYTES":
        try:
            return [base64.b64decode(item, validate=True) for item in flat]
        except (TypeError, binascii.Error):
            raise ProtocolError(f"input {name!r}: BYTES elements in JSON must be base64 strings") from None
    kind = bool if datatype == "BOOL" else (float if datatype.startswith("FP") else int)
    if not all(type(v) is kind or (kind is float and type(v) is int) for v in flat):
        raise ProtocolError(f"input {name!r}: {datatype} data must be JSON {kind.__name__}s")
    try:
        return np.asarray(flat, dtype=DTYPES[datatype]).reshape(shape)
    except OverflowError:
        raise ProtocolError(f"input {name!r}: a value is out of range for {datatype}") from None


def _parse_input(spec: Any, binary: memoryview, offset: int) -> tuple[Tensor, int]:
    """One entry of "inputs" -> the tensor and the offset after its binary data."""
    spec = _object(spec, "each input")
    name = spec.get("name")
    if not isinstance(name, str):
        raise ProtocolError("each input needs a string 'name'")
    datatype = spec.get("datatype")
    if datatype != "BYTES" and datatype not in DTYPES:
        raise ProtocolError(f"input {name!r}: unknown datatype {datatype!r}; use one of {', '.join(DTYPES)}, BYTES")
    shape = _shape(spec.get("shape"), name)
    params = _object(spec.get("parameters"), f"input {name!r} parameters")
    size = params.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size < 0 or offset + size > len(binary):
            raise ProtocolError(f"input {name!r}: binary_data_size {size!r} runs past the {len(binary)} binary bytes")
        data = _from_binary(binary[offset : offset + size], datatype, shape, name)
        return Tensor(name, datatype, shape, data, params), offset + size
    if "data" not in spec:
        raise ProtocolError(f"input {name!r} has neither 'data' nor parameters.binary_data_size")
    return Tensor(name, datatype, shape, _from_json(spec["data"], datatype, shape, name), params), offset


def parse_infer_request(body: bytes, header_length: str | None = None) -> InferRequest:
    """Parse an infer request body.

    Args:
        body: the whole request body.
        header_length: the `Inference-Header-Content-Length` header, when the request has one.

    Raises:
        ProtocolError: the body or a tensor in it is malformed.
    """
    if not body:
        raise ProtocolError("empty request body; send the infer request JSON")
    split = len(body)
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise ProtocolError(f"{HEADER_LENGTH} {header_length!r} is not a length within the {len(body)}-byte body")
        split = int(header_length)
    try:
        request = json.loads(body[:split])
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ProtocolError(f"the request is not valid JSON ({err})") from None
    request = _object(request, "the request")
    specs = request.get("inputs")
    if not isinstance(specs, list) or not specs:
        raise ProtocolError("the request needs a non-empty 'inputs' list")
    binary, offset, inputs = memoryview(body)[split:], 0, []
    for spec in specs:
        tensor, offset = _parse_input(spec, binary, offset)
        inputs.append(tensor)
    if offset != len(binary):
        raise ProtocolError(f"{len(binary) - offset} bytes of binary data follow the inputs unused")
    outputs = {}
    for spec in request.get("outputs") or []:
        spec = _object(spec, "each output")
        if not isinstance(spec.get("name"), str):
            raise ProtocolError("each requested output needs a string 'name'")
        outputs[spec["name"]] = _object(spec.get("parameters"), f"output {spec['name']!r} parameters")
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ProtocolError(f"the request's 'id' must be a string, not {request_id!r}")
    return InferRequest(inputs, outputs, _object(request.get("parameters"), "parameters"), request_id)


def classification(values: np.ndarray, k: int, labels: Sequence[str] | None) -> Tensor:
    """Triton's classification extension: the `k` largest of each row of `values` (N, C) as BYTES (N, k)
    "value:index:label" strings, largest first."""
    k = min(k, values.shape[-1])
    order = np.argsort(-values, axis=-1, kind="stable")[:, :k]
    items = [
        f"{values[row, i]:f}:{i}" + (f":{labels[i]}" if labels else "")
        for row in range(values.shape[0])
        for i in order[row]
    ]
    return Tensor("", "BYTES", [values.shape[0], k], [s.encode() for s in items])


def _to_binary(tensor: Tensor) -> bytes:
    if tensor.datatype == "BYTES":
        return b"".join(struct.pack("<I", len(item)) + item for item in tensor.data)
    return np.ascontiguousarray(tensor.data, dtype=DTYPES[tensor.datatype]).tobytes()


def _to_json(tensor: Tensor) -> list[Any]:
    if tensor.datatype == "BYTES":
        return [item.decode("utf-8", "replace") for item in tensor.data]
    return np.asarray(tensor.data).reshape(-1).tolist()


def encode_infer_response(
    model_name: str, outputs: Sequence[Tensor], binary: set[str], request_id: str | None = None
) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when some output is binary (else None).

    Args:
        model_name: the model's name.
        outputs: the tensors to send.
        binary: the names of the outputs to send as binary data after the JSON.
        request_id: the request's id, echoed back.
    """
    header: dict[str, Any] = {"model_name": model_name, "model_version": "1", "outputs": []}
    if request_id is not None:
        header["id"] = request_id
    chunks = []
    for tensor in outputs:
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        if tensor.name in binary:
            chunks.append(_to_binary(tensor))
            entry["parameters"] = {"binary_data_size": len(chunks[-1])}
        else:
            entry["data"] = _to_json(tensor)
        header["outputs"].append(entry)
    text = json.dumps(header).encode()
    if not chunks:
        return text, None
    return text + b"".join(chunks), len(text)


__all__ = [
    "DTYPES",
    "HEADER_LENGTH",
    "InferRequest",
    "ProtocolError",
    "Tensor",
    "classification",
    "encode_infer_response",
    "parse_infer_request",
]
