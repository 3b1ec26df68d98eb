"""The autoswitcher: decisions against known costs and loads, then live under a real flood."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import httpx
import pytest

from dyce.artifacts import ArtifactLayout, load_bank_for
from service.control.autoswitch import Autoswitcher
from service.control.costs import CostModel
from service.engine.tiers import TierState
from tests.conftest import LiveServer, metric_sum, scrape, service_settings


@pytest.fixture
def switcher(core_demo_artifacts):
    """Known costs: each tier's per-image time is proportional to its expected MACs (1 ms at 1.0),
    2 ms fixed per batch; no dwell times, so each decision shows the policy alone."""
    bank = load_bank_for(ArtifactLayout(core_demo_artifacts))
    settings = service_settings(
        core_demo_artifacts, autoswitch_min_dwell_down_s=0, autoswitch_min_dwell_up_s=0, max_batch_size=16
    )
    state = TierState(bank, "auto")
    tiers = state.active.tier.frontier()
    costs = CostModel(0.002, {t.config: 1e-3 * t.expected_relative_macs for t in tiers})
    actions: list[str] = []
    return Autoswitcher(settings, state, costs, [actions.append]), tiers, actions


def _load(switcher: Autoswitcher, images_per_second: float) -> None:
    """As if the last ``climb window`` seconds had seen this rate throughout."""
    span = switcher.settings.autoswitch_climb_window_s
    switcher.window = type(switcher.window)(span)
    now, slices = time.monotonic(), 100
    for k in range(slices):
        switcher.window.arrived(images_per_second * span / slices, at=now - (k + 0.5) * span / slices)


def test_picks_the_most_accurate_tier_that_keeps_up(switcher):
    auto, tiers, actions = switcher
    top, cheapest = tiers[0], tiers[-1]
    capacity = {t.index: auto.costs.capacity(t.config, 16) for t in tiers}
    assert capacity[cheapest.index] > 2 * capacity[top.index]
    _load(auto, 0.1 * capacity[top.index])
    assert auto.tick().tier.index == top.index and actions[-1] == "hold"
    # Well past what the top tier can take: straight to the best tier that copes.
    rate = 0.9 * capacity[cheapest.index] * auto.settings.autoswitch_target_utilisation
    _load(auto, rate)
    active = auto.tick()
    assert actions[-1] == "down" and active.reason == "autoswitch"
    fitting = [t for t in tiers if auto.fits(t, rate, 1.0)]
    assert active.tier.index == fitting[0].index
    # Far beyond every tier: the cheapest, and it stays there.
    _load(auto, 10 * capacity[cheapest.index])
    assert auto.tick().tier.index == cheapest.index
    assert auto.tick().tier.index == cheapest.index and actions[-1] == "hold_cheapest"
    # Load gone: climbs back to the top in one step.
    _load(auto, 0)
    assert auto.tick().tier.index == top.index and actions[-1] == "up"


def test_hysteresis_dwell_and_pin(switcher):
    auto, tiers, actions = switcher
    top = tiers[0]
    usable = auto.costs.capacity(top.config, 16) * auto.settings.autoswitch_target_utilisation
    _load(auto, 1.05 * usable)
    assert auto.tick().tier.index != top.index
    # Just under the top tier's limit, but inside the hysteresis band: no climb, no flapping.
    _load(auto, 0.95 * usable)
    for _ in range(5):
        assert auto.tick().tier.index != top.index and actions[-1] == "hold"
    # Climbing also waits for the dwell time.
    auto.settings = auto.settings.model_copy(update={"autoswitch_min_dwell_up_s": 3600})
    _load(auto, 0)
    assert auto.tick().tier.index != top.index and actions[-1] == "hold_dwell"
    # A manual pin overrides the autoswitcher completely.
    auto.state.set_mode("manual")
    assert auto.tick().tier.index != top.index and actions[-1] == "pinned"


def test_a_tier_whose_requests_miss_the_slo_is_left_and_penalised(switcher):
    auto, tiers, actions = switcher
    top = tiers[0]
    before = auto.costs.per_image(top.config)
    _load(auto, 0)
    auto.window.answered([1.5 * auto.slo_s] * 20)  # the rate looks fine, the latencies say otherwise
    active = auto.tick()
    assert actions[-1] == "down" and active.tier.index == tiers[1].index
    assert auto.costs.per_image(top.config) > before


def test_live_flood_steps_down_then_climbs_back(core_demo_artifacts, fmnist_pngs):
    settings = service_settings(
        core_demo_artifacts, autoswitch="auto", autoswitch_min_dwell_up_s=1.0, autoswitch_min_dwell_down_s=0.5
    )
    with LiveServer(settings) as server:
        top = server.engine.state.active.tier
        assert top.index == top.bank.most_accurate()
        stop = threading.Event()
        files = [("files", (f"{i}.png", png, "image/png")) for i, png in enumerate(fmnist_pngs[:16])]
        seen: set[int] = set()

        def flood() -> None:
            with httpx.Client(base_url=server.url, timeout=30) as client:
                while not stop.is_set():
                    response = client.post("/v1/classify/batch", files=files)
                    assert response.status_code in (200, 429), response.text
                    if response.status_code == 200:
                        seen.add(response.json()["tier"]["bank_index"])

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            floods = [pool.submit(flood) for _ in range(6)]
            deadline = time.monotonic() + 30
            while server.engine.state.active.tier.index == top.index and time.monotonic() < deadline:
                time.sleep(0.1)
            stepped_down = server.engine.state.active.tier.index != top.index
            time.sleep(1.0)
            stop.set()
            for future in floods:
                future.result()
        assert stepped_down, "a saturating flood never moved the autoswitcher off the top tier"
        deadline = time.monotonic() + 30
        while server.engine.state.active.tier.index != top.index and time.monotonic() < deadline:
            time.sleep(0.1)
        assert server.engine.state.active.tier.index == top.index, "did not climb back once the load stopped"
        samples = scrape(server.url)
        assert metric_sum(samples, "dyce_config_switches_total", reason="autoswitch") >= 2
        assert metric_sum(samples, "dyce_autoswitch_decisions_total", action="down") >= 1
        assert metric_sum(samples, "dyce_autoswitch_decisions_total", action="up") >= 1
        assert len(seen) >= 2
