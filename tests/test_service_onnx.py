"""The ONNX Runtime backend behind the real server: same answers as the torch backend."""

from __future__ import annotations

import shutil

import httpx
import pytest

from dyce.artifacts import ArtifactLayout, load_backbone, load_bank_for, load_exits
from offline.export_onnx import export_onnx
from service.engine.model import ModelRuntime, StartupError
from tests.conftest import LiveServer, service_settings


@pytest.fixture(scope="module")
def onnx_artifacts(core_demo_artifacts, tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx-artifacts") / "artifacts"
    shutil.copytree(core_demo_artifacts, root)
    layout = ArtifactLayout(root)
    backbone, _ = load_backbone(layout)
    exits, _ = load_exits(layout)
    export_onnx(backbone, exits, load_bank_for(layout).used_exits(), root / "onnx")
    return root


def _batch(url: str, pngs: list[bytes], lam: float) -> dict:
    files = [("files", (f"{i}.png", png, "image/png")) for i, png in enumerate(pngs)]
    response = httpx.post(f"{url}/v1/classify/batch", params={"lambda": lam, "top_k": 10}, files=files, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def test_served_answers_are_identical_across_backends(onnx_artifacts, live_server, fmnist_pngs):
    bank = load_bank_for(ArtifactLayout(onnx_artifacts))
    settings = service_settings(onnx_artifacts, autoswitch="manual", backend="onnxruntime", slo_p95_ms=60_000)
    with LiveServer(settings) as onnx_server:
        for url, platform in ((live_server.url, "pytorch_dyce"), (onnx_server.url, "onnxruntime_dyce")):
            assert httpx.get(f"{url}/v2/models/dyce").json()["platform"] == platform
            assert httpx.get(f"{url}/v2/models/dyce/config").json()["platform"] == platform
        positions_seen = set()
        for index in bank.frontier():
            lam = bank.entries[index].lam
            torch_answer = _batch(live_server.url, fmnist_pngs[:16], lam)
            onnx_answer = _batch(onnx_server.url, fmnist_pngs[:16], lam)
            assert torch_answer["tier"] == onnx_answer["tier"]
            for expected, got in zip(torch_answer["results"], onnx_answer["results"], strict=True):
                assert got["exit_position"] == expected["exit_position"]
                assert got["relative_macs"] == pytest.approx(expected["relative_macs"])
                by_class = {p["class_index"]: p["probability"] for p in expected["predictions"]}
                for prediction in got["predictions"]:
                    assert prediction["probability"] == pytest.approx(by_class[prediction["class_index"]], abs=1e-4)
                positions_seen.add(got["exit_position"])
        assert len(positions_seen) > 1, "the comparison must cover early exits, not only the final head"


def test_onnx_backend_refuses_a_bank_whose_exits_were_not_exported(onnx_artifacts, tmp_path):
    root = tmp_path / "artifacts"
    shutil.copytree(onnx_artifacts, root, ignore=shutil.ignore_patterns("onnx"))
    layout = ArtifactLayout(root)
    backbone, _ = load_backbone(layout)
    exits, _ = load_exits(layout)
    used = sorted(load_bank_for(layout).used_exits())
    export_onnx(backbone, exits, used[1:], root / "onnx")
    with pytest.raises(StartupError, match="no ONNX graph"):
        ModelRuntime(service_settings(root, backend="onnxruntime"))
