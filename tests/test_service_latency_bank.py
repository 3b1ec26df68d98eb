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
    "memory_format": "auto",
}


# A profile written before the rewrites and the layout setting were recorded.
H100_OLDER = {key: value for key, value in H100.items() if key not in ("segment_rewrites", "memory_format")}


@pytest.mark.parametrize("where", [H100, H100_OLDER], ids=["current", "older"])
def test_a_bank_profiled_elsewhere_is_served_and_says_so(core_demo_artifacts, tmp_path, caplog, where):
    root = tmp_path / "artifacts"
    shutil.copytree(core_demo_artifacts, root)
    bank = json.loads((root / "bank.json").read_text())
    # Relative times unlike the MACs: time is what the search traded against in this bank.
    latencies = [0.9 - 0.1 * i for i in range(len(bank["entries"]))]
    for entry, latency in zip(bank["entries"], latencies, strict=True):
        entry["search"]["relative_latency"] = latency
    bank["cost"] = {"kind": "latency", "where": where, "batch": 32, "table": bank["macs"]}
    (root / "bank.json").write_text(json.dumps(bank))
    served = Bank.load(root / "bank.json")
    with caplog.at_level("WARNING", logger="dyce.service"), LiveServer(service_settings(root)) as server:
        info = httpx.get(f"{server.url}/admin/bank", headers=server.admin(), timeout=30).json()
        assert info["cost"]["kind"] == "latency" and info["cost"]["batch"] == 32
        assert info["cost"]["where"] == {"segment_rewrites": None, "memory_format": None} | where
        differing = {d.split()[0] for d in info["cost"]["profiled_elsewhere"]}
        assert {"device_type", "host"} <= differing
        # What an older profile did not record cannot be taken as this server's set-up.
        assert ({"segment_rewrites", "memory_format"} <= differing) == (where is H100_OLDER)
        assert [e["expected_relative_latency"] for e in info["entries"]] == pytest.approx(latencies)
        assert any("costed on measured time of another set-up" in r.getMessage() for r in caplog.records)
        # The prior of each frontier tier is the plain model's cost times the tier's relative time.
        estimates = server.engine.autoswitcher.costs.estimates
        frontier = [served.entries[i] for i in served.frontier()]
        first, *rest = frontier
        for entry in rest:
            ratio = estimates[entry.config].per_image_s / estimates[first.config].per_image_s
            assert ratio == pytest.approx(entry.search.relative_latency / first.search.relative_latency)


@pytest.mark.parametrize(
    ("rewrite_segments", "memory_format", "differences"),
    [
        (True, "auto", []),
        (False, "auto", ["segment_rewrites True vs False"]),
        (True, "contiguous", ["memory_format 'auto' vs 'contiguous'"]),
    ],
)
def test_a_bank_profiled_as_dyce_serve_runs_by_default_warns_a_server_that_runs_otherwise(
    core_demo_artifacts, rewrite_segments, memory_format, differences
):
    """`dyce-offline profile` times rewritten segments in layouts tuned on the machine; served
    without rewrites, or in one fixed layout, those times are another set-up's, and the one
    difference named is that."""
    import torch

    from dyce.bank import CostBasis
    from dyce.profile import Where, host_name
    from service.engine.model import ModelRuntime

    settings = service_settings(core_demo_artifacts, rewrite_segments=rewrite_segments, memory_format=memory_format)
    runtime = ModelRuntime(settings)
    bank = runtime.initial_bank
    # What offline/profile.py records on this machine.
    profiled_here = Where(
        device_type="cpu",
        backend="torch",
        host=host_name("cpu"),
        threads=torch.get_num_threads(),
        segment_rewrites=True,
        memory_format="auto",
    )
    profiled = bank.model_copy(update={"cost": CostBasis(kind="latency", where=profiled_here, batch=32)})

    assert runtime.costed_elsewhere(profiled) == differences
