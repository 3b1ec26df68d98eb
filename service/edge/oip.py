"""Open Inference Protocol (KServe v2) tensors, including Triton's binary tensor extension.

A request body is JSON, optionally followed by raw tensor bytes: the JSON's length is in the
``Inference-Header-Content-Length`` header, and each input that travels in binary says how
many bytes it takes (``parameters.binary_data_size``), in input order. BYTES tensors are
sequences of 4-byte little-endian lengths, each followed by that many bytes.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import BadRequest

HEADER_LENGTH = "inference-header-content-length"

NUMPY_TYPES = {"FP32": np.dtype("<f4"), "INT64": np.dtype("<i8")}


class TensorSpec(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Any] = Field(default_factory=dict)
    data: list[Any] | None = None


class RequestedOutput(BaseModel):
    name: str
    parameters: dict[str, Any] = Field(default_factory=dict)


class InferRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    inputs: list[TensorSpec] = Field(min_length=1)
    outputs: list[RequestedOutput] | None = None


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """``model``'s JSON schema with its ``$defs`` substituted in place: an OpenAPI request body
    cannot point into a schema's own ``$defs``."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    return resolve(schema)


def parse_request(body: bytes, header_length: str | None) -> tuple[InferRequest, dict[str, bytes]]:
    """JSON header and each binary input's bytes, by input name."""
    if header_length is None:
        json_part, blob = body, b""
    else:
        try:
            length = int(header_length)
        except ValueError:
            raise BadRequest(f"Inference-Header-Content-Length {header_length!r} is not an integer") from None
        if not 0 < length <= len(body):
            raise BadRequest(f"Inference-Header-Content-Length {length} outside the body's {len(body)} bytes")
        json_part, blob = body[:length], body[length:]
    try:
        request = InferRequest.model_validate_json(json_part)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in err.errors())
        raise BadRequest(f"malformed inference request: {problems}") from None
    binary: dict[str, bytes] = {}
    offset = 0
    for tensor in request.inputs:
        size = tensor.parameters.get("binary_data_size")
        if size is None:
            continue
        if not isinstance(size, int) or size < 0 or offset + size > len(blob):
            raise BadRequest(f"input {tensor.name}: binary_data_size {size} does not fit the binary body")
        binary[tensor.name] = blob[offset : offset + size]
        offset += size
    if offset != len(blob):
        raise BadRequest(f"{len(blob) - offset} bytes of binary body belong to no input")
    return request, binary


def fp32_tensor(tensor: TensorSpec, raw: bytes | None, expected: tuple[int, ...], max_batch: int) -> np.ndarray:
    """A preprocessed image batch, checked for shape, size and finiteness."""
    if tensor.datatype != "FP32":
        raise BadRequest(f"input {tensor.name} must be FP32, got {tensor.datatype}")
    shape = tuple(tensor.shape)
    if len(shape) != len(expected) + 1 or shape[1:] != expected:
        raise BadRequest(
            f"input {tensor.name} must have shape [batch, {', '.join(map(str, expected))}], got {list(shape)}"
        )
    if not 1 <= shape[0] <= max_batch:
        raise BadRequest(f"input {tensor.name}: batch {shape[0]} outside 1..{max_batch}")
    count = math.prod(shape)
    if raw is not None:
        if len(raw) != count * 4:
            raise BadRequest(f"input {tensor.name}: {len(raw)} bytes for {count} FP32 values")
        array = np.frombuffer(raw, dtype=NUMPY_TYPES["FP32"])
    else:
        if tensor.data is None:
            raise BadRequest(f"input {tensor.name} has neither data nor binary_data_size")
        try:
            array = np.asarray(tensor.data, dtype=np.float32).reshape(-1)
        except (ValueError, TypeError, OverflowError):  # OverflowError: JSON integers past float range
            raise BadRequest(f"input {tensor.name}: data must be numbers within the FP32 range") from None
        if array.size != count:
            raise BadRequest(f"input {tensor.name}: {array.size} values for shape {list(shape)}")
    if not np.isfinite(array).all():
        raise BadRequest(f"input {tensor.name} contains NaN or infinite values")
    return array.reshape(shape)


def bytes_tensor(tensor: TensorSpec, raw: bytes | None, max_batch: int) -> list[bytes]:
    """Encoded images: binary length-prefixed elements, or base64 strings in JSON."""
    if tensor.datatype != "BYTES":
        raise BadRequest(f"input {tensor.name} must be BYTES, got {tensor.datatype}")
    shape = tuple(tensor.shape)
    if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
        raise BadRequest(f"input {tensor.name} must have shape [batch] or [batch, 1], got {list(shape)}")
    if not 1 <= shape[0] <= max_batch:
        raise BadRequest(f"input {tensor.name}: batch {shape[0]} outside 1..{max_batch}")
    if raw is not None:
        elements, offset = [], 0
        while offset < len(raw):
            if offset + 4 > len(raw):
                raise BadRequest(f"input {tensor.name}: truncated BYTES element length")
            (length,) = struct.unpack_from("<I", raw, offset)
            offset += 4
            if offset + length > len(raw):
                raise BadRequest(f"input {tensor.name}: BYTES element runs past the body")
            elements.append(raw[offset : offset + length])
            offset += length
    else:
        if tensor.data is None:
            raise BadRequest(f"input {tensor.name} has neither data nor binary_data_size")
        try:
            elements = [base64.b64decode(item, validate=True) for item in _flatten(tensor.data)]
        except (binascii.Error, TypeError, ValueError):
            raise BadRequest(f"input {tensor.name}: JSON BYTES data must be base64 strings") from None
    if len(elements) != shape[0]:
        raise BadRequest(f"input {tensor.name}: {len(elements)} elements for shape {list(shape)}")
    return elements


def _flatten(data: list[Any]) -> list[Any]:
    return [x for item in data for x in (_flatten(item) if isinstance(item, list) else [item])]


def encode_response(
    outputs: list[tuple[str, str, np.ndarray | list[bytes]]],
    binary_names: set[str],
    header: dict[str, Any],
) -> tuple[bytes, int | None]:
    """Response body and, when any output travels in binary, the JSON header's length."""
    described, blobs = [], []
    for name, datatype, value in outputs:
        shape = [len(value)] if datatype == "BYTES" else list(value.shape)
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
        if name in binary_names:
            raw = (
                b"".join(struct.pack("<I", len(v)) + v for v in value)
                if datatype == "BYTES"
                else np.ascontiguousarray(value, dtype=NUMPY_TYPES[datatype]).tobytes()
            )
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = [v.decode() for v in value] if datatype == "BYTES" else value.reshape(-1).tolist()
        described.append(entry)
    head = json.dumps({**header, "outputs": described}).encode()
    if not blobs:
        return head, None
    return head + b"".join(blobs), len(head)
