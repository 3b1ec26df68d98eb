"""A bank searched on measured time (issue 9, part 3) served: /admin/bank says where it was
profiled and how that differs from this server, and the autoswitcher's prior follows its time."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest

from dyce.bank import Bank
from tests.conftest import LiveServer, service_settings

H100 = {
    "device_type": "cuda",
    "backend": "torch",
    "host": "NVIDIA H100 80GB HBM3",
    "threads": 16,
    "segment_rewrites": True,
}


def test_a_bank_profiled_elsewhere_is_served_and_says_so(core_demo_artifacts, tmp_path, caplog):
    root = tmp_path / "artifacts"
    shutil.copytree(core_demo_artifacts, root)
    bank = json.loads((root / "bank.json").read_text())
    # Relative times unlike the MACs: time is what the search traded against in this bank.
    latencies = [0.9 - 0.1 * i for i in range(len(bank["entries"]))]
    for entry, latency in zip(bank["entries"], latencies, strict=True):
        entry["search"]["relative_latency"] = latency
    bank["cost"] = {"kind": "latency", "where": H100, "batch": 32, "table": bank["macs"]}
    (root / "bank.json").write_text(json.dumps(bank))
    served = Bank.load(root / "bank.json")
    with caplog.at_level("WARNING", logger="dyce.service"), LiveServer(service_settings(root)) as server:
        info = httpx.get(f"{server.url}/admin/bank", headers=server.admin(), timeout=30).json()
        assert info["cost"]["kind"] == "latency" and info["cost"]["where"] == H100 and info["cost"]["batch"] == 32
        differing = {d.split()[0] for d in info["cost"]["profiled_elsewhere"]}
        assert {"device_type", "host"} <= differing
        assert [e["expected_relative_latency"] for e in info["entries"]] == pytest.approx(latencies)
        assert any("costed on measured time of another set-up" in r.getMessage() for r in caplog.records)
        # The prior of each frontier tier is the plain model's cost times the tier's relative time.
        estimates = server.engine.autoswitcher.costs.estimates
        frontier = [served.entries[i] for i in served.frontier()]
        first, *rest = frontier
        for entry in rest:
            ratio = estimates[entry.config].per_image_s / estimates[first.config].per_image_s
            assert ratio == pytest.approx(entry.search.relative_latency / first.search.relative_latency)


@pytest.mark.parametrize("rewrite_segments", [True, False])
def test_a_bank_profiled_on_rewritten_segments_warns_a_server_that_runs_them_as_loaded(
    core_demo_artifacts, rewrite_segments
):
    """`dyce-offline profile` times rewritten segments; served without rewrites, those times are
    another set-up's, and the one difference named is that."""
    import torch

    from dyce.bank import CostBasis
    from dyce.profile import Where, host_name
    from service.engine.model import ModelRuntime

    runtime = ModelRuntime(service_settings(core_demo_artifacts, rewrite_segments=rewrite_segments))
    bank = runtime.initial_bank
    here = Where(device_type="cpu", backend="torch", host=host_name("cpu"), threads=torch.get_num_threads())
    profiled = bank.model_copy(
        update={"cost": CostBasis(kind="latency", where=here.model_copy(update={"segment_rewrites": True}), batch=32)}
    )

    assert runtime.costed_elsewhere(profiled) == ([] if rewrite_segments else ["segment_rewrites True vs False"])
