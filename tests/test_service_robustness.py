"""Bad input, overload, timeouts and disconnects: every request ends in an answer or an explicit
error, the server stays healthy, and the counters add up."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from bench.serving_harness import ServerProcess
from tests.conftest import FASHION_MNIST_LABELS, LiveServer, metric_sum, scrape, service_settings

# The hostile-input corpus runs against `dyce-serve` in its own process: a case that makes the
# server balloon (issue 11: a 1 KB PNG took it past 13 GB) must cost the server, not pytest.
# The cap is the pod's memory limit in deploy/k8s/deployment.yaml.
RSS_CAP_BYTES = 2 * 1024**3
CASE_DEADLINE_S = 5.0
# Planted in files of the served artefact directory: no answer may echo a file's content.
FILE_MARKER = "FILE-CONTENT-MARKER-7f3a"
JSON = {"content-type": "application/json"}
RAW_PNG = {"content-type": "image/png"}
INFER = "/v2/models/dyce/infer"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(
    width: int, height: int, idat: bytes | None = None, depth: int = 8, colour: int = 0, pre: bytes = b""
) -> bytes:
    """A grayscale PNG written by hand, so it can claim any size or hold any defect."""
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64) if idat is None else idat
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + pre + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header for a huge image with almost no data: a decompression bomb's shape."""
    return _png(width, height)


def _png_complete(width: int, height: int) -> bytes:
    """A fully valid all-black PNG whose pixel data really is ``width`` x ``height``: each row is a
    filter byte and ``width`` zeros, which zlib squeezes to almost nothing (issue 11, item 1)."""
    return _png(width, height, zlib.compress(bytes((width + 1) * height), 9))


def _encoded(image: np.ndarray | Image.Image, fmt: str, mode: str | None = None, **options) -> bytes:
    picture = image if isinstance(image, Image.Image) else Image.fromarray(image)
    if mode is not None:
        picture = picture.convert(mode)
    buffer = io.BytesIO()
    picture.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _scribbled(data: bytes) -> bytes:
    """16 bytes in the middle overwritten: for a small PNG, inside the compressed pixel data."""
    middle = len(data) // 2
    return data[:middle] + b"\xff" * 16 + data[middle + 16 :]


def _jpeg_sized(jpeg: bytes, width: int, height: int) -> bytes:
    """``jpeg`` with its SOF0 frame header claiming another size."""
    data = bytearray(jpeg)
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _multipart(parts: list[tuple[str, bytes]], boundary: str = "dyce-boundary") -> dict:
    """A multipart body written by hand: each part is (its header lines, its content)."""
    body = b"".join(f"--{boundary}\r\n{head}\r\n\r\n".encode() + content + b"\r\n" for head, content in parts)
    body += f"--{boundary}--\r\n".encode()
    return {"content": body, "headers": {"content-type": f"multipart/form-data; boundary={boundary}"}}


def _file_part(content: bytes, name: str = "file", content_type: str = "image/png") -> tuple[str, bytes]:
    return f'Content-Disposition: form-data; name="{name}"; filename="x.png"\r\nContent-Type: {content_type}', content


def _v2(inputs: list[dict], **extra) -> dict:
    return {"json": {"inputs": inputs, **extra}}


def _fp32(shape: list[int], data: list, datatype: str = "FP32", name: str = "input") -> dict:
    return {"name": name, "shape": shape, "datatype": datatype, "data": data}


def _raw_json(text: str) -> dict:
    """JSON text sent as written: numbers like 10**400 and NaN that json.dumps would not produce."""
    return {"content": text.encode(), "headers": JSON}


def _fp32_text(data: str, shape: str = "[1,1,28,28]", rest: str = "") -> dict:
    return _raw_json(f'{{"inputs":[{{"name":"input","shape":{shape},"datatype":"FP32","data":[{data}]}}]{rest}}}')


def _binary(header: dict, blob: bytes, length: str | None = None) -> dict:
    """Triton's binary tensor extension: JSON header, then raw bytes; the header's length in a header."""
    head = json.dumps(header).encode()
    return {"content": head + blob, "headers": {"Inference-Header-Content-Length": length or str(len(head))}}


def _bytes_input(size: int, shape: list[int] | None = None, datatype: str = "BYTES", name: str = "image") -> dict:
    return {
        "inputs": [
            {
                "name": name,
                "shape": [1] if shape is None else shape,
                "datatype": datatype,
                "parameters": {"binary_data_size": size},
            }
        ]
    }


def _element(data: bytes) -> bytes:
    return struct.pack("<I", len(data)) + data


class _Chunks:
    """A chunked body of ``total`` bytes; re-iterable, so the corpus can be sent twice."""

    def __init__(self, total: int) -> None:
        self.total = total

    def __iter__(self):
        for _ in range(self.total // 65536 + 1):
            yield b"\0" * 65536


def _raw(request: bytes) -> dict:
    """Bytes written to the socket as they are: what no HTTP client library would send."""
    return {"raw": request}


def bad_requests(
    png: bytes, image: np.ndarray, max_batch: int, max_body: int, admin: dict[str, str]
) -> list[tuple[str, str, str, dict]]:
    """(label, method, path, httpx kwargs) for requests the server must refuse with a 4xx JSON error.

    ``admin`` is the bearer header; the server's artefact directory holds the files that
    ``hostile_artifacts`` plants (notes.txt, garbage.json, not-a-bank.json, escape.json, sub/).
    """
    rgb = np.stack([image, image[::-1], image.T], axis=-1)
    jpeg = _encoded(image, "JPEG")
    webp = _encoded(image, "WEBP")
    zeros = [0.0] * 784
    zeros_text = ",".join(["0"] * 784)
    binary_nan = json.dumps({"inputs": [{**_fp32([1, 1, 28, 28], []), "parameters": {"binary_data_size": 3136}}]})
    binary_nan = binary_nan.replace(', "data": []', "")
    nan_blob = np.full(784, np.nan, dtype="<f4").tobytes()
    header = {"Inference-Header-Content-Length": str(len(binary_nan))}
    zero_blob = np.zeros(784, dtype="<f4").tobytes()
    fp32_binary = {"inputs": [{**_fp32([1, 1, 28, 28], []), "parameters": {"binary_data_size": 3136}}]}
    del fp32_binary["inputs"][0]["data"]
    wide = _png_complete(1_000_000, 1)
    deep = "[" * 100_000 + "]" * 100_000

    def image_case(label: str, content: bytes, content_type: str = "image/png") -> tuple[str, str, str, dict]:
        return label, "POST", "/v1/classify", {"content": content, "headers": {"content-type": content_type}}

    def infer(label: str, kwargs: dict, path: str = INFER) -> tuple[str, str, str, dict]:
        return label, "POST", path, kwargs

    def admin_post(label: str, path: str, **kwargs) -> tuple[str, str, str, dict]:
        return label, "POST", f"/admin/{path}", {"headers": admin | kwargs.pop("headers", {}), **kwargs}

    def reload(label: str, path: object) -> tuple[str, str, str, dict]:
        return admin_post(label, "bank/reload", json={"path": path})

    images = [
        image_case("empty body", b""),
        image_case("text as png", b"hello, I am not an image"),
        image_case("truncated png", png[: len(png) // 2]),
        image_case("corrupt png", _scribbled(png)),
        image_case("png magic only", b"\x89PNG\r\n\x1a\n"),
        image_case("png wrong magic", b"\x89PNX" + png[4:]),
        image_case("png bad IHDR crc", png[:29] + b"\0\0\0\0" + png[33:]),
        image_case("png IDAT not zlib", _png(28, 28, b"not zlib at all")),
        image_case("png IDAT too short", _png(28, 28, zlib.compress(bytes(10)))),
        image_case("png without IDAT", png[:33] + _chunk(b"IEND", b"")),
        image_case("png chunk length 2**31-1", png[:33] + struct.pack(">I", 2**31 - 1) + b"IDAT" + bytes(100)),
        image_case("png bit depth 3", _png(28, 28, depth=3)),
        image_case("png colour type 5", _png(28, 28, colour=5)),
        image_case("png width 0", _png(0, 28)),
        image_case("png height 0", _png(28, 0)),
        image_case("png zTXt bomb", _png(28, 28, pre=_chunk(b"zTXt", b"k\0\0" + zlib.compress(bytes(50_000_000), 9)))),
        image_case("png iCCP bomb", _png(28, 28, pre=_chunk(b"iCCP", b"p\0\0" + zlib.compress(bytes(50_000_000), 9)))),
        image_case("png 16-bit truncated", _encoded(image.astype(np.uint16) * 257, "PNG")[:200]),
        image_case("png palette truncated", _encoded(rgb, "PNG", mode="P")[:150]),
        image_case("png rgba corrupt", _scribbled(_encoded(rgb, "PNG", mode="RGBA"))),
        image_case("png la truncated", _encoded(image, "PNG", mode="LA")[:120]),
        image_case("decompression bomb", _png_claiming(100_000, 100_000)),
        image_case("png 65535x65535 header", _png_claiming(65535, 65535)),
        image_case("png 4097x4096 header", _png_claiming(4097, 4096)),
        image_case("png 2**31-1 x 1 header", _png_claiming(2**31 - 1, 1)),
        image_case("png 2**32-1 x 1 header", _png_claiming(2**32 - 1, 1)),
        image_case("png 1000000x1 valid", wide),
        image_case("png 1x1000000 valid", _png_complete(1, 1_000_000)),
        image_case("png 200000x1 valid", _png_complete(200_000, 1)),
        image_case("png 1x200000 valid", _png_complete(1, 200_000)),
        image_case("png 100000x2 valid", _png_complete(100_000, 2)),
        image_case("png 16000x3 valid", _png_complete(16_000, 3)),
        image_case("truncated jpeg", jpeg[:100]),
        image_case("jpeg half", jpeg[: len(jpeg) // 2], "image/jpeg"),
        image_case("jpeg SOI only", b"\xff\xd8", "image/jpeg"),
        image_case("jpeg SOI then garbage", b"\xff\xd8\xff" + bytes(range(256)) * 4, "image/jpeg"),
        image_case("jpeg height 0", _jpeg_sized(jpeg, 28, 0), "image/jpeg"),
        image_case("jpeg 65535x65535", _jpeg_sized(jpeg, 65535, 65535), "image/jpeg"),
        image_case("jpeg 60000x1", _jpeg_sized(jpeg, 60000, 1), "image/jpeg"),
        image_case("jpeg cmyk truncated", _encoded(rgb, "JPEG", mode="CMYK")[:300], "image/jpeg"),
        image_case("jpeg progressive truncated", _encoded(rgb, "JPEG", progressive=True)[:200], "image/jpeg"),
        image_case("webp truncated", webp[:30], "image/webp"),
        image_case("webp RIFF garbage", b"RIFF" + struct.pack("<I", 100) + b"WEBPVP8 " + bytes(100), "image/webp"),
        image_case("webp RIFF size lies", webp[:4] + struct.pack("<I", 2**31) + webp[8:40], "image/webp"),
        image_case("gif", _encoded(image, "GIF")),
        image_case(
            "gif animated", _encoded(image, "GIF", save_all=True, append_images=[Image.fromarray(image.T)]), "image/gif"
        ),
        image_case("bmp", _encoded(image, "BMP")),
        image_case("tiff", _encoded(image, "TIFF")),
        image_case("tiff deflate", _encoded(image, "TIFF", compression="tiff_adobe_deflate")),
        image_case("ico", _encoded(image, "ICO")),
        image_case("ppm", _encoded(image, "PPM")),
        image_case("pcx", _encoded(image, "PCX")),
        image_case("tga", _encoded(image, "TGA")),
        image_case("sgi", _encoded(image, "SGI")),
        image_case("blp", _encoded(rgb, "BLP", mode="P")),
        image_case("qoi", _encoded(rgb, "QOI")),
        image_case("dds", _encoded(rgb, "DDS")),
        image_case("xbm", _encoded(image, "XBM", mode="1")),
        image_case("spider", _encoded(image, "SPIDER", mode="F")),
        image_case("pdf", _encoded(rgb, "PDF")),
        image_case("svg", b'<svg xmlns="http://www.w3.org/2000/svg" width="28" height="28"/>', "image/svg+xml"),
    ]
    multipart = [
        ("multipart without file", "POST", "/v1/classify", {"files": {"other": ("x.png", png, "image/png")}}),
        (
            "multipart broken",
            "POST",
            "/v1/classify",
            {"content": b"--zz\r\nnonsense", "headers": {"content-type": "multipart/form-data; boundary=zz"}},
        ),
        ("two files to single", "POST", "/v1/classify", {"files": [("file", png), ("file", png)]}),
        ("too many files", "POST", "/v1/classify/batch", {"files": [("files", png)] * (max_batch + 1)}),
        (
            "multipart no boundary",
            "POST",
            "/v1/classify",
            {"content": _multipart([_file_part(png)])["content"], "headers": {"content-type": "multipart/form-data"}},
        ),
        (
            "multipart boundary mismatch",
            "POST",
            "/v1/classify",
            {**_multipart([_file_part(png)]), "headers": {"content-type": "multipart/form-data; boundary=other"}},
        ),
        ("multipart empty file", "POST", "/v1/classify", _multipart([_file_part(b"")])),
        (
            "multipart text file",
            "POST",
            "/v1/classify",
            _multipart([_file_part(b"not an image", content_type="text/plain")]),
        ),
        ("multipart gif file", "POST", "/v1/classify", _multipart([_file_part(_encoded(image, "GIF"))])),
        ("multipart 1000000x1 file", "POST", "/v1/classify", _multipart([_file_part(wide)])),
        (
            "multipart file as plain field",
            "POST",
            "/v1/classify",
            _multipart([('Content-Disposition: form-data; name="file"', b"iVBORw0KGgo=")]),
        ),
        (
            "multipart 2000 fields",
            "POST",
            "/v1/classify/batch",
            _multipart([(f'Content-Disposition: form-data; name="f{i}"', b"x") for i in range(2000)]),
        ),
        ("multipart part without disposition", "POST", "/v1/classify", _multipart([("Content-Type: image/png", png)])),
        (
            "multipart 2 MB field",
            "POST",
            "/v1/classify",
            _multipart([('Content-Disposition: form-data; name="note"', b"x" * 2_000_000), _file_part(png)]),
        ),
        (
            "multipart truncated part",
            "POST",
            "/v1/classify",
            {**_multipart([_file_part(png)]), "content": _multipart([_file_part(png)])["content"][:120]},
        ),
        (
            "batch no files",
            "POST",
            "/v1/classify/batch",
            _multipart([('Content-Disposition: form-data; name="x"', b"1")]),
        ),
        ("batch one corrupt", "POST", "/v1/classify/batch", {"files": [("files", png), ("files", png[:50])]}),
        ("batch one gif", "POST", "/v1/classify/batch", {"files": [("files", png), ("files", _encoded(image, "GIF"))]}),
        (
            "batch one 1x1000000",
            "POST",
            "/v1/classify/batch",
            {"files": [("files", png), ("files", _png_complete(1, 1_000_000))]},
        ),
    ]
    content_types = [
        image_case("text/plain", png, "text/plain"),
        ("no content type", "POST", "/v1/classify", {"content": png}),
        image_case("application/json", png, "application/json"),
        image_case("application/octet-stream", png, "application/octet-stream"),
        image_case("image/gif type", png, "image/gif"),
        image_case("image/* type", png, "image/*"),
        image_case("bare image type", png, "image"),
        image_case("form urlencoded", png, "application/x-www-form-urlencoded"),
        image_case("multipart/mixed", png, "multipart/mixed; boundary=zz"),
        image_case("4 KB content type", png, "image/" + "x" * 4096),
        infer("v2 gzip", {"content": zlib.compress(b"{}"), "headers": {"content-encoding": "gzip"}}),
        infer("v2 brotli", {"content": b"\x0b\x00\x80{}\x03", "headers": {"content-encoding": "br"}}),
    ]
    raw_png = {"content": png, "headers": RAW_PNG}
    queries = [
        ("top_k zero", "POST", "/v1/classify?top_k=0", raw_png),
        ("top_k negative", "POST", "/v1/classify?top_k=-3", raw_png),
        ("top_k float", "POST", "/v1/classify?top_k=1.5", raw_png),
        ("top_k text", "POST", "/v1/classify?top_k=many", raw_png),
        ("top_k 5000 digits", "POST", "/v1/classify?top_k=" + "9" * 5000, raw_png),
        ("lambda out of range", "POST", "/v1/classify?lambda=2", raw_png),
        ("lambda negative", "POST", "/v1/classify?lambda=-0.1", raw_png),
        ("lambda not a number", "POST", "/v1/classify?lambda=abc", raw_png),
        ("lambda nan", "POST", "/v1/classify?lambda=nan", raw_png),
        ("lambda inf", "POST", "/v1/classify?lambda=inf", raw_png),
        ("lambda 5000 digits", "POST", "/v1/classify?lambda=" + "1" * 5000, raw_png),
        ("two tier selectors", "POST", "/v1/classify?lambda=0.5&max_relative_macs=0.5", raw_png),
        ("max_relative_macs zero", "POST", "/v1/classify?max_relative_macs=0", raw_png),
        ("max_relative_macs negative", "POST", "/v1/classify?max_relative_macs=-1", raw_png),
        ("max_relative_macs nan", "POST", "/v1/classify?max_relative_macs=nan", raw_png),
        ("max_relative_macs below every tier", "POST", "/v1/classify?max_relative_macs=1e-9", raw_png),
        ("batch lambda out of range", "POST", "/v1/classify/batch?lambda=7", {"files": [("files", png)]}),
        ("query string 20 KB", "POST", "/v1/classify?lambda=0.5&pad=" + "x" * 20_000, raw_png),
        (
            "query string 200 KB",
            "RAW",
            "-",
            _raw(b"GET /v2/health/ready?" + b"a=1&" * 50_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"),
        ),
    ]
    v2 = [
        infer("v2 malformed json", {"content": b'{"inputs": [', "headers": JSON}),
        infer("v2 json list", {"json": [1, 2, 3]}),
        infer("v2 empty body", {"content": b"", "headers": JSON}),
        infer("v2 body null", _raw_json("null")),
        infer("v2 body string", _raw_json('"hello"')),
        infer(
            "v2 utf-8 BOM",
            {"content": b"\xef\xbb\xbf" + json.dumps({"inputs": [_fp32([1, 1, 28, 28], zeros)]}).encode()},
        ),
        infer("v2 invalid utf-8", {"content": b'{"inputs": [{"name": "\xff\xfe"}]}', "headers": JSON}),
        infer(
            "v2 trailing garbage",
            {"content": json.dumps(_v2([_fp32([1, 1, 28, 28], zeros)])["json"]).encode() + b" xyz"},
        ),
        infer(
            "v2 100000-deep nesting",
            _raw_json(f'{{"inputs":[{{"name":"input","shape":[1],"datatype":"FP32","data":{deep}}}]}}'),
        ),
        infer("v2 no inputs", _v2([])),
        infer("v2 inputs null", {"json": {"inputs": None}}),
        infer("v2 inputs object", {"json": {"inputs": {"name": "input"}}}),
        infer(
            "v2 input without name",
            {"json": {"inputs": [{"shape": [1, 1, 28, 28], "datatype": "FP32", "data": zeros}]}},
        ),
        infer(
            "v2 input without datatype",
            {"json": {"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "data": zeros}]}},
        ),
        infer("v2 1000 inputs", _v2([_fp32([1], [0.0]) for _ in range(1000)])),
        infer("v2 wrong shape", _v2([_fp32([1, 3, 28, 28], zeros * 3)])),
        infer("v2 shape empty", _v2([_fp32([], zeros)])),
        infer("v2 shape negative batch", _v2([_fp32([-1, 1, 28, 28], zeros)])),
        infer("v2 shape negative dims", _v2([_fp32([1, 1, -28, -28], zeros)])),
        infer("v2 shape batch 10**9", _v2([_fp32([10**9, 1, 28, 28], zeros)])),
        infer("v2 shape 10**30", _fp32_text(zeros_text, shape=f"[{10**30},1,28,28]")),
        infer("v2 shape floats", _fp32_text(zeros_text, shape="[1.5,1,28,28]")),
        infer("v2 shape object", _fp32_text(zeros_text, shape='{"batch":1}')),
        infer("v2 wrong dtype", _v2([_fp32([1, 1, 28, 28], zeros, "INT32")])),
        infer("v2 dtype fp32 lowercase", _v2([_fp32([1, 1, 28, 28], zeros, "fp32")])),
        infer("v2 dtype FP64", _v2([_fp32([1, 1, 28, 28], zeros, "FP64")])),
        infer("v2 dtype BYTES for input", _v2([_fp32([1, 1, 28, 28], ["aGVsbG8="] * 784, "BYTES")])),
        infer("v2 nan json", {"content": json.dumps({"inputs": [_fp32([1, 1, 28, 28], [float("nan")] * 784)]})}),
        infer("v2 raw NaN one value", _fp32_text("NaN," + ",".join(["0"] * 783))),
        infer("v2 raw Infinity", _fp32_text("Infinity," + ",".join(["0"] * 783))),
        infer("v2 raw -Infinity", _fp32_text("-Infinity," + ",".join(["0"] * 783))),
        infer("v2 integer 10**400", _fp32_text(f"{10**400}," + ",".join(["0"] * 783))),
        infer("v2 integer -10**400", _fp32_text(f"-{10**400}," + ",".join(["0"] * 783))),
        infer("v2 float 1e400", _fp32_text("1e400," + ",".join(["0"] * 783))),
        infer("v2 float 1e39 overflows fp32", _fp32_text("1e39," + ",".join(["0"] * 783))),
        infer("v2 null values", _fp32_text(",".join(["null"] * 784))),
        infer("v2 nested ragged", _fp32_text(f"[{zeros_text}],[0]")),
        infer(
            "v2 data object",
            _raw_json('{"inputs":[{"name":"input","shape":[1,1,28,28],"datatype":"FP32","data":{"a":1}}]}'),
        ),
        infer(
            "v2 data string",
            _raw_json('{"inputs":[{"name":"input","shape":[1,1,28,28],"datatype":"FP32","data":"abc"}]}'),
        ),
        infer("v2 no data no binary", _v2([{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32"}])),
        infer("v2 nan binary", {"content": binary_nan.encode() + nan_blob, "headers": header}),
        infer("v2 value count", _v2([_fp32([1, 1, 28, 28], zeros[:-1])])),
        infer("v2 strings as fp32", _v2([_fp32([1, 1, 28, 28], ["a"] * 784)])),
        infer("v2 unknown input", _v2([_fp32([1, 1, 28, 28], zeros, name="pixels")])),
        infer("v2 two inputs", _v2([_fp32([1, 1, 28, 28], zeros), _fp32([1, 1, 28, 28], zeros)])),
        infer("v2 unknown model", _v2([_fp32([1, 1, 28, 28], zeros)]), "/v2/models/resnet/infer"),
        infer("v2 unknown version", _v2([_fp32([1, 1, 28, 28], zeros)]), "/v2/models/dyce/versions/2/infer"),
        infer("v2 version with NUL", _v2([_fp32([1, 1, 28, 28], zeros)]), "/v2/models/dyce/versions/1%00/infer"),
        infer("v2 model traversal", _v2([_fp32([1, 1, 28, 28], zeros)]), "/v2/models/..%2F..%2Fadmin/infer"),
        infer("v2 header beyond body", {"content": b"{}", "headers": {"Inference-Header-Content-Length": "99"}}),
        infer("v2 header not int", {"content": b"{}", "headers": {"Inference-Header-Content-Length": "x"}}),
        infer("v2 header length 0", _binary(fp32_binary, zero_blob, "0")),
        infer("v2 header length negative", _binary(fp32_binary, zero_blob, "-5")),
        infer("v2 header length 10**30", _binary(fp32_binary, zero_blob, str(10**30))),
        infer("v2 header length cuts the json", _binary(fp32_binary, zero_blob, "20")),
        infer("v2 binary size too big", {"content": binary_nan.encode() + nan_blob[:100], "headers": header}),
        infer("v2 binary size negative", _binary(_bytes_input(-4, [1, 1, 28, 28], "FP32", "input"), zero_blob)),
        infer("v2 binary size string", _binary(_bytes_input("3136", [1, 1, 28, 28], "FP32", "input"), zero_blob)),  # type: ignore[arg-type]
        infer("v2 binary size float", _binary(_bytes_input(3135.5, [1, 1, 28, 28], "FP32", "input"), zero_blob)),  # type: ignore[arg-type]
        infer("v2 binary bytes of no input", _binary(_v2([_fp32([1, 1, 28, 28], zeros)])["json"], zero_blob)),
        infer(
            "v2 binary fp32 wrong size", _binary(_bytes_input(3132, [1, 1, 28, 28], "FP32", "input"), zero_blob[:-4])
        ),
        infer("v2 bytes element truncated", _binary(_bytes_input(14), struct.pack("<I", 1000) + png[:10])),
        infer("v2 bytes length prefix truncated", _binary(_bytes_input(2), b"\x10\x00")),
        infer("v2 bytes fewer elements than shape", _binary(_bytes_input(len(png) + 4, [2]), _element(png))),
        infer("v2 bytes empty element", _binary(_bytes_input(4), _element(b""))),
        infer(
            "v2 bytes gif element",
            _binary(_bytes_input(len(_encoded(image, "GIF")) + 4), _element(_encoded(image, "GIF"))),
        ),
        infer("v2 bytes 1000000x1 png", _binary(_bytes_input(len(wide) + 4), _element(wide))),
        infer(
            "v2 bytes 1x1000000 png",
            _v2([_fp32([1], [base64.b64encode(_png_complete(1, 1_000_000)).decode()], "BYTES", "image")]),
        ),
        infer("v2 bytes shape [1, 2]", _binary(_bytes_input(len(png) + 4, [1, 2]), _element(png))),
        infer("v2 bytes shape []", _binary(_bytes_input(len(png) + 4, []), _element(png))),
        infer("v2 fp32 for image", _v2([_fp32([1, 1, 28, 28], zeros, "FP32", "image")])),
        infer("v2 bytes json numbers", _v2([_fp32([1], [1], "BYTES", "image")])),
        infer("v2 bad base64", _v2([_fp32([1], ["***"], "BYTES", "image")])),
        infer("v2 bytes not image", _v2([_fp32([1], ["aGVsbG8="], "BYTES", "image")])),
        infer("v2 bytes truncated png", _v2([_fp32([1], [base64.b64encode(png[:60]).decode()], "BYTES", "image")])),
        infer("v2 batch too big", _v2([_fp32([max_batch + 1, 1, 28, 28], zeros * (max_batch + 1))])),
        infer("v2 unknown output", _v2([_fp32([1, 1, 28, 28], zeros)], outputs=[{"name": "logits"}])),
        infer("v2 outputs not a list", _v2([_fp32([1, 1, 28, 28], zeros)], outputs={"name": "label"})),
        infer("v2 output without name", _v2([_fp32([1, 1, 28, 28], zeros)], outputs=[{"parameters": {}}])),
        infer("v2 id a number", _v2([_fp32([1, 1, 28, 28], zeros)], id=12)),
        infer("v2 parameters a list", _v2([_fp32([1, 1, 28, 28], zeros)], parameters=[0.5])),
        infer("v2 bad parameter", _v2([_fp32([1, 1, 28, 28], zeros)], parameters={"lambda": "high"})),
        infer("v2 lambda 5", _v2([_fp32([1, 1, 28, 28], zeros)], parameters={"lambda": 5})),
        infer("v2 lambda -1", _v2([_fp32([1, 1, 28, 28], zeros)], parameters={"lambda": -1})),
        infer("v2 lambda raw NaN", _fp32_text(zeros_text, rest=',"parameters":{"lambda":NaN}')),
        infer("v2 lambda raw Infinity", _fp32_text(zeros_text, rest=',"parameters":{"lambda":Infinity}')),
        infer("v2 lambda true", _v2([_fp32([1, 1, 28, 28], zeros)], parameters={"lambda": True})),
        infer("v2 lambda list", _v2([_fp32([1, 1, 28, 28], zeros)], parameters={"lambda": [0.5]})),
        infer("v2 lambda 10**400", _fp32_text(zeros_text, rest=f',"parameters":{{"lambda":{10**400}}}')),
        infer("v2 max_relative_macs 0", _v2([_fp32([1, 1, 28, 28], zeros)], parameters={"max_relative_macs": 0})),
        infer("v2 max_relative_macs -1", _v2([_fp32([1, 1, 28, 28], zeros)], parameters={"max_relative_macs": -1})),
        infer(
            "v2 max_relative_macs text", _v2([_fp32([1, 1, 28, 28], zeros)], parameters={"max_relative_macs": "cheap"})
        ),
        infer("v2 max_relative_macs raw NaN", _fp32_text(zeros_text, rest=',"parameters":{"max_relative_macs":NaN}')),
        infer("v2 max_relative_macs 1e-9", _v2([_fp32([1, 1, 28, 28], zeros)], parameters={"max_relative_macs": 1e-9})),
        infer(
            "v2 both tier parameters",
            _v2([_fp32([1, 1, 28, 28], zeros)], parameters={"lambda": 0.5, "max_relative_macs": 0.5}),
        ),
        infer("v2 body over the limit", {"content": b'{"inputs": [' + b" " * (max_body + 10) + b"]}", "headers": JSON}),
        ("v2 metadata unknown model", "GET", "/v2/models/resnet", {}),
        ("v2 metadata unknown version", "GET", "/v2/models/dyce/versions/7", {}),
        ("v2 ready unknown model", "GET", "/v2/models/resnet/ready", {}),
        ("v2 config unknown model", "GET", "/v2/models/resnet/config", {}),
        ("v2 config unknown version", "GET", "/v2/models/dyce/versions/0/config", {}),
    ]
    admin_cases = [
        admin_post("switch unknown field", "active", json={"temperature": 1}),
        admin_post("switch lambda text", "active", json={"lambda": "high"}),
        admin_post("switch lambda 2", "active", json={"lambda": 2}),
        admin_post("switch lambda negative", "active", json={"lambda": -0.5}),
        admin_post("switch lambda raw NaN", "active", content=b'{"lambda": NaN}', headers=JSON),
        admin_post("switch lambda raw Infinity", "active", content=b'{"lambda": Infinity}', headers=JSON),
        admin_post("switch lambda 10**400", "active", content=f'{{"lambda": {10**400}}}'.encode(), headers=JSON),
        admin_post("switch index negative", "active", json={"index": -1}),
        admin_post("switch index past the bank", "active", json={"index": 10**6}),
        admin_post("switch index float", "active", json={"index": 1.5}),
        admin_post("switch index list", "active", json={"index": [0]}),
        admin_post("switch nothing", "active", json={}),
        admin_post("switch two selectors", "active", json={"lambda": 0.5, "index": 0}),
        admin_post("switch max_relative_macs 0", "active", json={"max_relative_macs": 0}),
        admin_post("switch max_relative_macs negative", "active", json={"max_relative_macs": -2}),
        admin_post("switch max_relative_macs 1e-9", "active", json={"max_relative_macs": 1e-9}),
        admin_post("switch min_accuracy 1.5", "active", json={"min_accuracy": 1.5}),
        admin_post("switch min_accuracy unreachable", "active", json={"min_accuracy": 1.0}),
        admin_post("switch body list", "active", json=[{"lambda": 0.5}]),
        admin_post("switch body string", "active", json="lambda=0.5"),
        admin_post("switch body null", "active", content=b"null", headers=JSON),
        admin_post("switch malformed json", "active", content=b'{"lambda": ', headers=JSON),
        admin_post("switch single quotes", "active", content=b"{'lambda': 0.5}", headers=JSON),
        admin_post("switch trailing comma", "active", content=b'{"lambda": 0.5,}', headers=JSON),
        admin_post("switch comment", "active", content=b'{"lambda": 0.5 /* top */}', headers=JSON),
        admin_post("switch 100000-deep nesting", "active", content=deep.encode(), headers=JSON),
        admin_post(
            "switch form body",
            "active",
            content=b"lambda=0.5",
            headers={"content-type": "application/x-www-form-urlencoded"},
        ),
        admin_post("mode turbo", "mode", json={"mode": "turbo"}),
        admin_post("mode upper case", "mode", json={"mode": "AUTO"}),
        admin_post("mode number", "mode", json={"mode": 1}),
        admin_post("mode missing", "mode", json={}),
        admin_post("mode unknown field", "mode", json={"mode": "manual", "force": True}),
        admin_post("mode null", "mode", json={"mode": None}),
        reload("reload NUL in path", "bank\u0000.json"),
        reload("reload 300-character name", "b" * 295 + ".json"),
        reload("reload 5000-character path", "/".join(["d" * 99] * 50) + ".json"),
        reload("reload traversal", "../../../../etc/passwd"),
        reload("reload traversal through a file", "bank.json/../../outside.json"),
        reload("reload absolute path", "/etc/passwd"),
        reload("reload absolute /proc", "/proc/self/environ"),
        reload("reload symlink out", "escape.json"),
        reload("reload missing file", "nope.json"),
        reload("reload directory", "sub"),
        reload("reload artefact root", "."),
        reload("reload non-JSON file", "notes.txt"),
        reload("reload malformed JSON file", "garbage.json"),
        reload("reload JSON that is not a bank", "not-a-bank.json"),
        reload("reload weights file", "backbone.safetensors"),
        reload("reload another manifest", "backbone.json"),
        reload("reload url", "http://127.0.0.1:1/bank.json"),
        reload("reload path number", 7),
        reload("reload path list", ["bank.json"]),
        admin_post("reload unknown field", "bank/reload", json={"path": "bank.json", "force": True}),
        admin_post("reload malformed json", "bank/reload", content=b'{"path": "bank.json"', headers=JSON),
        ("admin no token", "GET", "/admin/bank", {}),
        ("admin wrong token", "GET", "/admin/bank", {"headers": {"Authorization": "Bearer not-the-token"}}),
        ("admin basic auth", "GET", "/admin/active", {"headers": {"Authorization": "Basic YWRtaW46YWRtaW4="}}),
        ("admin bearer without token", "GET", "/admin/active", {"headers": {"Authorization": "Bearer"}}),
        ("admin 10 KB token", "GET", "/admin/active", {"headers": {"Authorization": "Bearer " + "t" * 10_000}}),
        ("admin token in query", "GET", "/admin/bank?token=" + admin["Authorization"].split()[1], {}),
        ("admin switch without token", "POST", "/admin/active", {"json": {"index": 0}}),
        ("admin reload without token", "POST", "/admin/bank/reload", {"json": {"path": "bank.json"}}),
        (
            "admin mode wrong token",
            "POST",
            "/admin/mode",
            {"json": {"mode": "auto"}, "headers": {"Authorization": "Bearer x"}},
        ),
    ]
    routes = [
        ("unknown route", "GET", "/v3/anything", {}),
        ("unknown v1 route", "POST", "/v1/classify/extra", raw_png),
        ("unknown admin route", "GET", "/admin/unknown", {"headers": admin}),
        ("unknown infer suffix", "POST", "/v2/models/dyce/infer/extra", _v2([_fp32([1, 1, 28, 28], zeros)])),
        ("encoded traversal", "GET", "/%2e%2e/%2e%2e/etc/passwd", {}),
        ("encoded NUL in path", "GET", "/v1/%00", {}),
        ("7 KB path", "GET", "/" + "p" * 7000, {}),
        ("wrong method", "GET", "/v1/classify", {}),
        ("PUT classify", "PUT", "/v1/classify", raw_png),
        ("DELETE batch", "DELETE", "/v1/classify/batch", {}),
        ("OPTIONS classify", "OPTIONS", "/v1/classify", {}),
        ("TRACE classify", "TRACE", "/v1/classify", {}),
        ("GET infer", "GET", INFER, {}),
        ("PATCH admin active", "PATCH", "/admin/active", {"headers": admin, "json": {"index": 0}}),
        ("DELETE admin bank", "DELETE", "/admin/bank", {"headers": admin}),
        ("POST live", "POST", "/v2/health/live", {}),
        ("POST ready", "POST", "/v2/health/ready", {}),
        ("POST metrics", "POST", "/metrics", {}),
        ("PUT model metadata", "PUT", "/v2/models/dyce", {}),
    ]
    limits = [
        image_case("declared oversize", b"\0" * (max_body + 1)),
        ("chunked oversize", "POST", "/v1/classify", {"content": _Chunks(max_body + 65536), "headers": RAW_PNG}),
        ("oversize multipart", "POST", "/v1/classify/batch", {"files": [("files", b"\0" * (max_body + 1))]}),
        # Past the edge's caps but within one socket read, so the refusal is not lost to a reset.
        (
            "5000 headers",
            "RAW",
            "-",
            _raw(
                b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n"
                + b"".join(b"x-h%d: 1\r\n" % i for i in range(5000))
                + b"\r\n"
            ),
        ),
        (
            "100 KB header",
            "RAW",
            "-",
            _raw(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 100_000 + b"\r\n\r\n"),
        ),
        ("malformed request line", "RAW", "-", _raw(b"GARBAGE\r\n\r\n")),
        ("http/9.9", "RAW", "-", _raw(b"GET /v2/health/ready HTTP/9.9\r\nHost: x\r\n\r\n")),
        (
            "content-length not a number",
            "RAW",
            "-",
            _raw(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n"),
        ),
        (
            "content-length negative",
            "RAW",
            "-",
            _raw(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n"),
        ),
        (
            "bad chunk size",
            "RAW",
            "-",
            _raw(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nZZZ\r\nabc\r\n0\r\n\r\n"),
        ),
        ("header without colon", "RAW", "-", _raw(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nnonsense\r\n\r\n")),
        ("NUL in header", "RAW", "-", _raw(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n")),
        ("raw 64 KB URL", "RAW", "-", _raw(b"GET /" + b"u" * 65536 + b" HTTP/1.1\r\nHost: x\r\n\r\n")),
    ]
    return images + multipart + content_types + queries + v2 + admin_cases + routes + limits


def _unusual_valid_images(image: np.ndarray) -> list[tuple[str, bytes]]:
    """Modes and containers a client may legitimately send: each must be classified (200)."""
    gray = Image.fromarray(image)
    rgb = Image.fromarray(np.stack([image, image[::-1], image.T], axis=-1))
    frames = {"save_all": True, "append_images": [gray.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]}
    return [
        ("png 16-bit", _encoded(image.astype(np.uint16) * 257, "PNG")),
        ("png palette", _encoded(rgb, "PNG", mode="P")),
        ("png palette transparency", _encoded(rgb, "PNG", mode="P", transparency=0)),
        ("png rgba", _encoded(rgb, "PNG", mode="RGBA")),
        ("png la", _encoded(gray, "PNG", mode="LA")),
        ("png 1-bit", _encoded(gray, "PNG", mode="1")),
        ("png animated", _encoded(gray, "PNG", **frames)),
        ("png 1x1", _encoded(Image.new("L", (1, 1)), "PNG")),
        ("png 28x400", _encoded(gray.resize((28, 400)), "PNG")),
        ("png 448x448", _encoded(gray.resize((448, 448)), "PNG")),
        ("jpeg cmyk", _encoded(rgb, "JPEG", mode="CMYK")),
        ("jpeg progressive", _encoded(rgb, "JPEG", progressive=True)),
        ("jpeg gray", _encoded(gray, "JPEG")),
        ("webp lossless", _encoded(rgb, "WEBP", lossless=True)),
        ("webp rgba", _encoded(rgb, "WEBP", mode="RGBA")),
        ("webp animated", _encoded(gray, "WEBP", **frames)),
    ]


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def hostile_artifacts(source: Path, target: Path) -> Path:
    """A copy of the test artefacts plus files a reload must refuse without echoing them."""
    shutil.copytree(source, target)
    (target / "notes.txt").write_text(f"{FILE_MARKER}: these are not the bank you are looking for\n")
    (target / "garbage.json").write_text(f'{{"{FILE_MARKER}": [1, 2,')
    (target / "not-a-bank.json").write_text(json.dumps({"entries": FILE_MARKER, "marker": FILE_MARKER}))
    (target / "sub").mkdir()
    outside = target.parent / "outside.json"
    outside.write_text(json.dumps({"marker": FILE_MARKER}))
    (target / "escape.json").symlink_to(outside)
    return target


class GuardedServer:
    """``dyce-serve`` in its own process under an RSS watchdog that kills it past the cap.

    A killed or crashed server is started again, so one case that takes the server down does
    not hide what the rest of the corpus does to it.
    """

    def __init__(self, artifacts: Path, log_dir: Path, **settings: object) -> None:
        self.artifacts, self.log_dir, self.settings = artifacts, log_dir, settings
        self.server: ServerProcess | None = None
        self.peak_rss = 0
        self.killed_at_rss = 0
        self.starts = 0
        self._stop = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, name="rss-watchdog", daemon=True)

    def start(self) -> None:
        self.starts += 1
        self.server = ServerProcess(self.artifacts, self.log_dir / f"server-{self.starts}.log", **self.settings)
        self.server.__enter__()

    def __enter__(self) -> GuardedServer:
        self.start()
        self._watchdog.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._watchdog.join(timeout=5)
        if self.server is not None:
            self.server.__exit__()

    @property
    def pid(self) -> int:
        return self.server.process.pid

    @property
    def url(self) -> str:
        return self.server.url

    def alive(self) -> bool:
        return self.server.process.poll() is None

    def rss(self) -> int:
        return _rss_bytes(self.pid)

    def _watch(self) -> None:
        while not self._stop.wait(0.02):
            server = self.server
            if server is None or server.process.poll() is not None:
                continue
            try:
                rss = _rss_bytes(server.process.pid)
            except (OSError, RuntimeError):
                continue
            self.peak_rss = max(self.peak_rss, rss)
            if rss > RSS_CAP_BYTES:
                self.killed_at_rss = rss
                server.process.kill()


def _send(server: GuardedServer, method: str, path: str, kwargs: dict) -> tuple[int, bytes]:
    """One request on a fresh connection (a refused one may close it); RAW cases go to the socket."""
    if method != "RAW":
        with httpx.Client(base_url=server.url, timeout=CASE_DEADLINE_S * 2) as client:
            response = client.request(method, path, **kwargs)
            return response.status_code, response.content
    with socket.create_connection(("127.0.0.1", server.server.port), timeout=CASE_DEADLINE_S * 2) as sock:
        sock.sendall(kwargs["raw"])
        received = b""
        while b"\r\n\r\n" not in received or len(received.split(b"\r\n\r\n", 1)[1]) < _length(received):
            data = sock.recv(65536)
            if not data:
                break
            received += data
    if not received.startswith(b"HTTP/1.1 "):
        raise ConnectionError(f"no HTTP answer, {len(received)} bytes: {received[:80]!r}")
    head, _, body = received.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def _length(received: bytes) -> int:
    head = received.split(b"\r\n\r\n", 1)[0].lower()
    for line in head.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 1 << 62  # no length: read until the server closes


def run_corpus(server: GuardedServer, corpus: list[tuple[str, str, str, dict]], token: str) -> list[str]:
    """Send every case; returns one line per case that did not get a quick 4xx JSON error."""
    failures = []
    for label, method, path, kwargs in corpus:
        started = time.monotonic()
        try:
            status, content = _send(server, method, path, kwargs)
        except (httpx.HTTPError, OSError) as err:
            status, content = None, f"{type(err).__name__}: {err}".encode()
        elapsed = time.monotonic() - started
        problem = _problem(status, content, elapsed, token)
        if not server.alive():
            cause = f"killed at {server.killed_at_rss / 2**30:.1f} GiB RSS" if server.killed_at_rss else "crashed"
            problem = f"server {cause}" + (f"; {problem}" if problem else "")
            server.killed_at_rss = 0
            server.start()
        elif problem is None:
            try:
                if httpx.get(f"{server.url}/v2/health/ready", timeout=CASE_DEADLINE_S).status_code != 200:
                    problem = "not ready afterwards"
            except httpx.HTTPError as err:
                problem = f"readiness probe failed afterwards: {err}"
        if problem is not None:
            failures.append(f"{label}: {problem}")
    return failures


def _problem(status: int | None, content: bytes, elapsed: float, token: str) -> str | None:
    if status is None:
        return f"no answer ({content.decode(errors='replace')[:200]})"
    text = content.decode(errors="replace")
    if not 400 <= status < 500:
        return f"{status} {text[:300]}"
    if elapsed > CASE_DEADLINE_S:
        return f"{status} after {elapsed:.1f} s"
    try:
        body = json.loads(content)
    except ValueError:
        return f"{status} not JSON: {text[:200]}"
    if not (isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"]):
        return f"{status} without an error message: {text[:200]}"
    if not (isinstance(body.get("code"), str) and body["code"]):
        return f"{status} without a code: {text[:200]}"
    if FILE_MARKER in text or token in text:
        return f"{status} echoes a file's content or the admin token: {text[:200]}"
    return None


@pytest.fixture(scope="module")
def guarded_server(core_demo_artifacts, tmp_path_factory) -> Iterator[GuardedServer]:
    root = tmp_path_factory.mktemp("hostile")
    artifacts = hostile_artifacts(core_demo_artifacts, root / "artifacts")
    with GuardedServer(artifacts, root, autoswitch="manual", max_batch_size=16, calibration_rounds=2) as server:
        yield server


def _classify(url: str, png: bytes) -> tuple[str, list[dict]]:
    response = httpx.post(f"{url}/v1/classify", content=png, headers=RAW_PNG, timeout=30)
    assert response.status_code == 200, response.text
    return response.headers["x-config-id"], response.json()["predictions"]


def test_hostile_corpus_gets_quick_4xx_json_and_leaves_the_server_as_it_was(
    guarded_server, fmnist_pngs, fmnist_test_images
):
    server = guarded_server.server
    token = server.token
    corpus = bad_requests(fmnist_pngs[0], fmnist_test_images[0][0], 16, 8 * 1024 * 1024, server.admin_headers)
    labels = [label for label, *_ in corpus]
    assert len(corpus) >= 150 and len(set(labels)) == len(labels)
    reference = _classify(guarded_server.url, fmnist_pngs[1])

    warm_up_failures = run_corpus(guarded_server, corpus, token)  # allocator pools and caches settle
    restarts = guarded_server.starts
    before = guarded_server.rss()
    counters = scrape(guarded_server.url)
    failures = run_corpus(guarded_server, corpus, token)
    after = guarded_server.rss()

    assert not warm_up_failures + failures, (
        f"{len(set(warm_up_failures + failures))} of {len(corpus)} cases failed (first pass, then second):\n"
        + "\n".join(dict.fromkeys(warm_up_failures + failures))
    )
    assert guarded_server.starts == restarts == 1
    assert _classify(guarded_server.url, fmnist_pngs[1]) == reference, "the same image now gets another answer"
    assert after <= before * 1.10, f"RSS grew from {before / 2**20:.0f} to {after / 2**20:.0f} MiB over the corpus"
    # The server's own counters agree: not one 5xx.
    samples = scrape(guarded_server.url)
    errors = sum(
        value - counters.get(key, 0)
        for key, value in samples.items()
        if key[0] == "dyce_requests_total" and dict(key[1]).get("status", "").startswith("5")
    )
    assert errors == 0


def test_unusual_but_valid_images_are_classified(guarded_server, fmnist_test_images):
    image = fmnist_test_images[0][0]
    labels = set(FASHION_MNIST_LABELS)
    failures = []
    for label, data in _unusual_valid_images(image):
        response = httpx.post(f"{guarded_server.url}/v1/classify", content=data, headers=RAW_PNG, timeout=30)
        if response.status_code != 200:
            failures.append(f"{label}: {response.status_code} {response.text[:200]}")
            continue
        predictions = response.json()["predictions"]
        if predictions[0]["label"] not in labels or not 0 < predictions[0]["probability"] <= 1:
            failures.append(f"{label}: {predictions[:1]}")
    assert not failures, "\n".join(failures)


@pytest.fixture(scope="module")
def overload_server(core_demo_artifacts):
    """No batching, two queue slots, pinned to the most expensive tier: easy to overload."""
    settings = service_settings(
        core_demo_artifacts, autoswitch="manual", max_batch_size=1, queue_capacity=2, max_queue_delay_ms=0
    )
    with LiveServer(settings) as server:
        yield server


def test_overload_answers_429_with_retry_after_and_every_request_is_counted(overload_server, fmnist_pngs):
    url = overload_server.url
    before = scrape(url)

    def post(png: bytes) -> httpx.Response:
        with httpx.Client(base_url=url, timeout=60) as client:
            return client.post("/v1/classify", content=png, headers={"content-type": "image/png"})

    sent = 64
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        responses = list(pool.map(post, fmnist_pngs[:sent]))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429} and statuses.count(429) > 0 and statuses.count(200) > 0
    for response in responses:
        if response.status_code == 429:
            assert response.headers["retry-after"] == "1" and response.json()["code"] == "queue_full"
    after = scrape(url)

    def delta(name: str, **labels: str) -> float:
        return metric_sum(after, name, **labels) - metric_sum(before, name, **labels)

    route = {"route": "/v1/classify"}
    assert delta("dyce_requests_total", **route) == sent
    assert delta("dyce_requests_total", status="200", **route) == statuses.count(200)
    assert delta("dyce_rejections_total", reason="queue_full") == statuses.count(429)
    assert delta("dyce_request_duration_seconds_count", **route) == sent
    assert delta("dyce_batch_size_sum") == statuses.count(200), "only admitted requests reach the model"
    assert metric_sum(after, "dyce_queue_depth") == 0 and metric_sum(after, "dyce_in_flight_requests") == 1


@pytest.fixture(scope="module")
def slow_batching_server(core_demo_artifacts):
    """Batches wait 400 ms for company: long enough to time out or hang up before any model work."""
    settings = service_settings(core_demo_artifacts, autoswitch="manual", max_queue_delay_ms=400, request_timeout_s=5)
    with LiveServer(settings) as server:
        yield server


def test_client_disconnect_spends_no_model_work(slow_batching_server, fmnist_pngs):
    url = slow_batching_server.url
    before = scrape(url)
    png = fmnist_pngs[0]
    request = (
        f"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: {len(png)}\r\n\r\n"
    ).encode() + png
    with socket.create_connection(("127.0.0.1", slow_batching_server.port)) as sock:
        sock.sendall(request)
        time.sleep(0.1)  # the server has the request queued; now hang up
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        after = scrape(url)
        if metric_sum(after, "dyce_rejections_total", reason="client_disconnect") > metric_sum(
            before, "dyce_rejections_total", reason="client_disconnect"
        ):
            break
        time.sleep(0.1)
    else:
        pytest.fail("the disconnect was never accounted for")
    time.sleep(0.6)  # past the batching delay: a leaked job would have run by now
    after = scrape(url)
    assert metric_sum(after, "dyce_batch_size_count") == metric_sum(before, "dyce_batch_size_count")
    assert (
        metric_sum(after, "dyce_requests_total", status="499")
        == metric_sum(before, "dyce_requests_total", status="499") + 1
    )
    assert metric_sum(after, "dyce_in_flight_requests") == 1


def test_request_timeout_answers_504_before_any_model_work(core_demo_artifacts, fmnist_pngs):
    settings = service_settings(core_demo_artifacts, autoswitch="manual", max_queue_delay_ms=400, request_timeout_s=0.1)
    with LiveServer(settings) as server:
        before = scrape(server.url)
        response = httpx.post(
            f"{server.url}/v1/classify", content=fmnist_pngs[0], headers={"content-type": "image/png"}
        )
        assert response.status_code == 504 and response.json()["code"] == "timeout"
        time.sleep(0.6)
        after = scrape(server.url)
        assert metric_sum(after, "dyce_batch_size_count") == metric_sum(before, "dyce_batch_size_count")
        assert metric_sum(after, "dyce_rejections_total", reason="timeout") == 1


@pytest.mark.parametrize("token", ["", "changeme"])
def test_dyce_serve_refuses_a_placeholder_admin_token(token, tmp_path):
    env = {"DYCE_ADMIN_TOKEN": token, "DYCE_ARTIFACTS_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-m", "service"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "DYCE_ADMIN_TOKEN" in result.stderr and "DYCE_INSECURE_DEV" in result.stderr


def test_dyce_serve_explains_missing_artefacts(tmp_path):
    env = {"DYCE_ADMIN_TOKEN": "a-real-secret-of-some-length", "DYCE_ARTIFACTS_DIR": str(tmp_path), "DYCE_PORT": "0"}
    result = subprocess.run([sys.executable, "-m", "service"], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "dyce-offline build" in result.stderr


def test_insecure_dev_mode_generates_a_token_instead_of_running_open():
    from pydantic import ValidationError

    from service import Settings

    with pytest.raises(ValidationError, match="DYCE_INSECURE_DEV"):
        Settings(admin_token="admin")
    dev = Settings(admin_token="", insecure_dev=True)
    assert dev.generated_admin_token and len(dev.admin_token.get_secret_value()) >= 24
    assert Settings(admin_token="", insecure_dev=True).admin_token != dev.admin_token
    assert not Settings(admin_token="a-real-secret-of-some-length").generated_admin_token
