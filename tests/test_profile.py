"""Latency profiles (issue 9, part 3): format, the cost table against a hand computation, a real
measurement through the serving backend, and the latency-costed search against brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dyce.artifacts import ArtifactLayout, load_backbone, load_bank_for, load_exits
from dyce.execution_backends import TorchBackend
from dyce.profile import LatencyProfile, Where, default_buckets, host_name, measure_latency
from dyce.simulate import ExitRecords
from tests.test_offline_search import assert_searches_reach_brute_force

WHERE = Where(device_type="cpu", backend="torch", host="test cpu x2", threads=2)


def synthetic_profile() -> LatencyProfile:
    """Two buckets, three positions; the early exits are slow for their size (launch-bound)."""
    return LatencyProfile(
        where=WHERE,
        backbone_sha256="0" * 64,
        buckets=(1, 4),
        segment_s=((1e-3, 2e-3, 3e-3), (2e-3, 4e-3, 8e-3)),
        head_s=(1e-4, 2e-4),
        exit_s=(((5e-4, 9e-4), (7e-4, 1.1e-3), ()), ((6e-4, 1e-3), (8e-4, 1.2e-3), ())),
    )


def test_cost_table_is_nanoseconds_per_image_of_the_serving_bucket():
    profile = synthetic_profile()
    # Batch 3 is served from bucket 4: every batch time divided by 4 images, in ns.
    table = profile.cost_table(3)
    assert table.segment_macs == (500_000, 1_000_000, 2_000_000)
    assert table.head_macs == 50_000
    assert table.exit_macs == ((150_000, 250_000), (200_000, 300_000), ())
    assert profile.cost_table(1).segment_macs == (1_000_000, 2_000_000, 3_000_000)
    assert profile.cost_table(64).head_macs == 50_000  # past the largest bucket: the largest
    assert profile.per_image_s(4) == pytest.approx((2e-3 + 4e-3 + 8e-3 + 2e-4) / 4)
    assert LatencyProfile.model_validate_json(profile.model_dump_json()) == profile


def test_default_buckets_cover_the_max_batch():
    assert default_buckets(32) == (1, 2, 4, 8, 16, 32)
    assert default_buckets(24) == (1, 2, 4, 8, 16, 24)
    assert default_buckets(1) == (1,)


def test_where_lists_what_differs():
    other = WHERE.model_copy(update={"device_type": "cuda", "host": "NVIDIA H100"})
    assert WHERE.differences(WHERE) == []
    assert [d.split()[0] for d in WHERE.differences(other)] == ["device_type", "host"]


def test_measured_profile_has_the_mac_tables_shape(core_demo_artifacts):
    layout = ArtifactLayout(core_demo_artifacts)
    backbone, manifest = load_backbone(layout)
    exits, _ = load_exits(layout)
    macs = load_bank_for(layout).macs
    backend = TorchBackend(backbone, exits, torch.device("cpu"), True)
    where = Where(device_type="cpu", backend="torch", host=host_name("cpu"), threads=torch.get_num_threads())
    seen = []
    profile = measure_latency(
        backend, backbone.input_spec.shape, exits, where, manifest.identity.weights_sha256, (1, 4), 3, seen.append
    )
    assert seen == [1, 4]
    table = profile.cost_table(4)
    assert len(table.segment_macs) == len(macs.segment_macs)
    assert [len(e) for e in table.exit_macs] == [len(e) for e in macs.exit_macs]
    assert all(v > 0 for v in table.segment_macs) and table.head_macs > 0
    assert all(np.isfinite(s) and s > 0 for bucket in profile.segment_s for s in bucket)
    assert LatencyProfile.model_validate_json(profile.model_dump_json()) == profile


def test_latency_costed_searches_reach_the_brute_force_optimum_on_measured_time():
    """The searches read the cost table wherever they read MACs: with a table in which exits are
    expensive for their MACs, their optimum is brute force's on *time*, not on MACs."""
    rng = np.random.default_rng(7)
    positions, kinds, samples = 3, 2, 10
    confidence = rng.choice(np.linspace(0.3, 1.0, 5), size=(positions, kinds, samples)).astype(np.float32)
    correct = rng.random((positions, kinds, samples)) < 0.7
    correct[-1, 0, 0] = True
    confidence[-1, 1:], correct[-1, 1:] = np.nan, False
    records = ExitRecords(confidence, correct, (kinds, kinds, 1))
    assert_searches_reach_brute_force(records, synthetic_profile().cost_table(4))
