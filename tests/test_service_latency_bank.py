"""A bank searched on measured time (issue 9, part 3) served: /admin/bank says where it was
profiled and how that differs from this server, and the autoswitcher's prior follows its time."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest

from dyce.bank import Bank
from tests.conftest import LiveServer, service_settings

H100 = {"device_type": "cuda", "backend": "torch", "host": "NVIDIA H100 80GB HBM3", "threads": 16}


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
