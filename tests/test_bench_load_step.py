"""bench/load_step.py's open-loop load, split over several generator processes, against a real
server: the merged arrivals are one Poisson stream at the asked rate, every request sent is
accounted for, and each process sends its share.

The references are Poisson facts, not the generator's own bookkeeping: a count over a window
is Poisson (mean rate x seconds), and the gaps of a Poisson stream have a coefficient of
variation of 1 (interleaved regular streams would have far less).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # the benches import each other by name

import load_step  # noqa: E402
from serve import v2_bodies  # noqa: E402

IMAGES_PER_REQUEST = 2
REQUESTS_PER_S = 60.0
SECONDS = 3.0


@pytest.fixture(scope="module")
def bodies(live_server, fmnist_pngs):
    return v2_bodies(live_server.engine.runtime, fmnist_pngs[:16], IMAGES_PER_REQUEST, live_server.settings.model_name)


def test_generator_processes_share_one_poisson_stream(live_server, bodies):
    generators = 3
    run = load_step.open_loop(
        live_server.url,
        live_server.admin(),
        bodies,
        [(REQUESTS_PER_S * IMAGES_PER_REQUEST, SECONDS)],
        IMAGES_PER_REQUEST,
        seed=7,
        generators=generators,
    )
    expected = REQUESTS_PER_S * SECONDS
    sent = np.array([o.sent for o in run.outcomes])
    # Within 4 standard deviations of a Poisson count: fails about once in 15,000 runs.
    assert abs(len(sent) - expected) < 4 * math.sqrt(expected), len(sent)
    assert sent.min() >= 0 and sent.max() < SECONDS
    # Every request came back with an answer, from the server's one pinned tier.
    assert [o.status for o in run.outcomes] == [200] * len(sent)
    assert {o.bank_index for o in run.outcomes} == {live_server.engine.state.active.tier.index}
    # Each process sent its own Poisson share.
    share = expected / generators
    for generator in range(generators):
        count = sum(o.generator == generator for o in run.outcomes)
        assert abs(count - share) < 4 * math.sqrt(share), (generator, count)
    # The merged gaps look Poisson: coefficient of variation near 1 (interleaved regular streams: far less).
    gaps = np.diff(np.sort(sent))
    cv = gaps.std() / gaps.mean()
    assert 0.75 < cv < 1.3, cv
    # The lag list has one entry per request, and the tier was polled throughout.
    assert len(run.lag) == len(sent)
    assert run.tiers and run.tiers[-1][0] >= SECONDS - 0.5


def test_a_failing_generator_is_reported_not_waited_for(live_server, bodies):
    # A body the generator cannot even unpack: the child fails at once; the parent must say so.
    with pytest.raises(RuntimeError, match="generator 0"):
        load_step.open_loop(live_server.url, live_server.admin(), [("bad",)], [(10.0, 1.0)], 1, seed=0, generators=1)
