"""Open Inference Protocol v2 (KServe, Triton): health, metadata, config and inference."""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from ...engine.model import PLATFORMS
from ...errors import BadRequest, NotFound, NotReady
from ..deps import GatewayDep
from ..gateway import Gateway
from ..oip import HEADER_LENGTH, InferRequest, bytes_tensor, encode_response, fp32_tensor, inline_schema, parse_request

router = APIRouter(prefix="/v2", tags=["v2"])

VERSION = "1"
INPUT_TENSOR = "input"  # FP32 [batch, C, H, W], already preprocessed
IMAGE_TENSOR = "image"  # BYTES [batch], encoded PNG/JPEG/WebP
OUTPUTS = {  # name -> (datatype, per-image dims; -1 = the number of classes)
    "probabilities": ("FP32", [-1]),
    "exit_position": ("INT64", []),
    "relative_macs": ("FP32", []),
    "label": ("BYTES", []),
}


def _model(gateway: Gateway, name: str, version: str | None = None) -> None:
    if name != gateway.settings.model_name or version not in (None, VERSION):
        raise NotFound(
            f"unknown model {name!r} (version {version or 'any'}); this server has {gateway.settings.model_name!r}"
        )


def _tensor_specs(gateway: Gateway) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    gateway.engine.check_ready()
    model = gateway.engine.info
    classes = len(model.labels)
    inputs = [
        {"name": INPUT_TENSOR, "datatype": "FP32", "shape": [-1, *model.input_shape]},
        # [batch, 1], Triton's shape for one string per image: perf_analyzer sizes its requests
        # from this with the batch dimension removed, and [] leaves it nothing to send.
        {"name": IMAGE_TENSOR, "datatype": "BYTES", "shape": [-1, 1]},
    ]
    outputs = [
        {"name": name, "datatype": dtype, "shape": [-1, *(classes if d == -1 else d for d in dims)]}
        for name, (dtype, dims) in OUTPUTS.items()
    ]
    return inputs, outputs


@router.get("")
async def server_metadata() -> dict[str, Any]:
    return {"name": "dyce-serve", "version": "0.1.0", "extensions": ["binary_tensor_data", "model_configuration"]}


@router.get("/health/live")
async def live(gateway: GatewayDep) -> JSONResponse:
    """False (503) once the service cannot serve any more: a dead inference worker or a failed
    warm-up. Kubernetes restarts such a replica; ``dyce-serve`` itself exits non-zero."""
    engine = gateway.engine
    if engine.live:
        return JSONResponse({"live": True})
    body = {"live": False, "error": engine.fatal, "code": "not_live"}
    return JSONResponse(body, status_code=503, headers={"x-error-code": "not_live"})


def _readiness(gateway: Gateway, body: dict[str, Any]) -> JSONResponse:
    """200 once warmed up; else 503 in the service's error shape (``error``, ``code``) beside the
    protocol's ``ready`` field. A 503 before warm-up is expected, not a server fault: its code
    labels it for the metrics."""
    engine = gateway.engine
    if engine.ready:
        return JSONResponse({**body, "ready": True})
    reason = engine.fatal or "the model is loading or warming up"
    return JSONResponse(
        {**body, "ready": False, "error": reason, "code": NotReady.reason},
        status_code=503,
        headers={"x-error-code": NotReady.reason},
    )


@router.get("/health/ready")
async def ready(gateway: GatewayDep) -> JSONResponse:
    return _readiness(gateway, {})


@router.get("/models/{name}")
@router.get("/models/{name}/versions/{version}")
async def model_metadata(gateway: GatewayDep, name: str, version: str | None = None) -> dict[str, Any]:
    _model(gateway, name, version)
    inputs, outputs = _tensor_specs(gateway)
    platform = PLATFORMS[gateway.settings.backend]
    return {"name": name, "versions": [VERSION], "platform": platform, "inputs": inputs, "outputs": outputs}


@router.get("/models/{name}/ready")
@router.get("/models/{name}/versions/{version}/ready")
async def model_ready(gateway: GatewayDep, name: str, version: str | None = None) -> JSONResponse:
    _model(gateway, name, version)
    return _readiness(gateway, {"name": name})


@router.get("/models/{name}/config")
@router.get("/models/{name}/versions/{version}/config")
async def model_config(gateway: GatewayDep, name: str, version: str | None = None) -> dict[str, Any]:
    """Triton's model configuration: with max_batch_size > 0, dims leave out the batch dimension.
    Triton needs at least one dim, so a per-image scalar output (metadata shape [-1]) is dims [1]
    with ``reshape: {shape: []}``, exactly as Triton itself describes such a tensor."""
    _model(gateway, name, version)
    inputs, outputs = _tensor_specs(gateway)
    settings = gateway.settings

    def triton(tensor: dict[str, Any]) -> dict[str, Any]:
        dims = tensor["shape"][1:]
        described = {
            "name": tensor["name"],
            "data_type": f"TYPE_{'STRING' if tensor['datatype'] == 'BYTES' else tensor['datatype']}",
            "dims": dims or [1],
        }
        if not dims:
            described["reshape"] = {"shape": []}
        return described

    return {
        "name": name,
        "platform": PLATFORMS[settings.backend],
        "max_batch_size": settings.max_batch_size,
        "input": [triton(t) for t in inputs],
        "output": [triton(t) for t in outputs],
        "dynamic_batching": {
            "max_queue_delay_microseconds": int(settings.max_queue_delay_ms * 1000),
            "default_queue_policy": {
                "max_queue_size": settings.queue_capacity,
                "default_timeout_microseconds": int(settings.request_timeout_s * 1e6),
            },
        },
        "parameters": {"slo_p95_ms": {"string_value": f"{settings.slo_p95_ms:g}"}},
    }


# The JSON form of an inference request; the binary tensor extension appends raw bytes after it
# (application/octet-stream, with Inference-Header-Content-Length), which no schema describes.
INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": inline_schema(InferRequest)},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


@router.post("/models/{name}/infer", openapi_extra=INFER_BODY)
@router.post("/models/{name}/versions/{version}/infer", openapi_extra=INFER_BODY)
async def infer(request: Request, gateway: GatewayDep, name: str, version: str | None = None) -> Response:
    """Inputs: ``input`` (FP32 preprocessed) or ``image`` (BYTES encoded). Request parameters
    ``lambda`` or ``max_relative_macs`` choose a tier for this request."""
    arrived = request.state.arrived  # set by the edge middleware, before the body was read
    _model(gateway, name, version)
    gateway.engine.check_ready()
    engine, model = gateway.engine, gateway.engine.info
    if request.headers.get("content-encoding", "identity") != "identity":
        raise BadRequest("compressed inference requests are not accepted; send them uncompressed")
    body, settings = await request.body(), gateway.settings
    infer_request, binary = parse_request(body, request.headers.get(HEADER_LENGTH))
    if len(infer_request.inputs) != 1:
        raise BadRequest(f"send exactly one input tensor: {INPUT_TENSOR!r} (FP32) or {IMAGE_TENSOR!r} (BYTES)")
    requested = infer_request.outputs or []
    unknown = [o.name for o in requested if o.name not in OUTPUTS]
    if unknown:
        raise BadRequest(f"unknown outputs {unknown}; outputs are {list(OUTPUTS)}")
    names = [o.name for o in requested] or list(OUTPUTS)
    all_binary = bool(infer_request.parameters.get("binary_data_output", False))
    binary_names = {o.name for o in requested if o.parameters.get("binary_data", all_binary)}
    if not requested and all_binary:
        binary_names = set(names)
    lam = _number_parameter(infer_request.parameters, "lambda", low=0.0, high=1.0)
    budget = _number_parameter(infer_request.parameters, "max_relative_macs", low=0.0, low_inclusive=False)
    tensor = infer_request.inputs[0]
    # Everything cheap is checked; only then is the request admitted, and only then decoded.
    if tensor.name == INPUT_TENSOR:
        array = fp32_tensor(tensor, binary.get(tensor.name), model.input_shape, settings.max_batch_size)
        with engine.admission(array.shape[0], array.nbytes, lam, budget) as ticket:
            served = await gateway.classify(request, ticket, torch.from_numpy(array.copy()), arrived)
    elif tensor.name == IMAGE_TENSOR:
        blobs = bytes_tensor(tensor, binary.get(tensor.name), settings.max_batch_size)
        with engine.admission(len(blobs), sum(map(len, blobs)), lam, budget) as ticket:
            served = await gateway.classify(request, ticket, await gateway.decode(blobs), arrived)
    else:
        raise BadRequest(f"unknown input {tensor.name!r}; inputs are {INPUT_TENSOR!r} and {IMAGE_TENSOR!r}")
    result = served.answer

    top = result.probabilities.argmax(dim=1).tolist()
    values = {
        "probabilities": result.probabilities.numpy(),
        "exit_position": result.exit_positions.astype(np.int64),
        "relative_macs": result.relative_macs.astype(np.float32),
        "label": [model.labels[c].encode() for c in top],
    }
    header = {
        "model_name": name,
        "model_version": VERSION,
        "parameters": {
            "lambda": result.tier.lam,
            "config_id": result.tier.config_id,
            "bank_index": result.tier.index,
            "tier_source": "request" if result.requested else "active",
            "queue_time_ms": result.queue_s * 1e3,
            "inference_time_ms": result.inference_s * 1e3,
        },
    }
    if infer_request.id is not None:
        header["id"] = infer_request.id
    content, header_length = encode_response([(n, OUTPUTS[n][0], values[n]) for n in names], binary_names, header)
    headers = {"x-total-time": f"{(time.perf_counter() - arrived) * 1e3:.3f}"}
    if header_length is None:
        return Response(content, media_type="application/json", headers=headers)
    headers["Inference-Header-Content-Length"] = str(header_length)
    return Response(content, media_type="application/octet-stream", headers=headers)


def _number_parameter(
    parameters: dict[str, Any], key: str, low: float, high: float = math.inf, low_inclusive: bool = True
) -> float | None:
    """The same bounds as v1's query parameters (``lambda`` in [0, 1], ``max_relative_macs`` > 0)."""
    value = parameters.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"parameter {key} must be a number")
    try:
        number = float(value)
    except OverflowError:  # an integer past the float range
        number = math.inf
    above_low = number >= low if low_inclusive else number > low
    if not (math.isfinite(number) and above_low and number <= high):
        bounds = f"{'[' if low_inclusive else '('}{low:g}, {high:g}]"
        # The value is not echoed: a huge JSON integer cannot even be printed.
        raise BadRequest(f"parameter {key} must be a finite number in {bounds}")
    return number
