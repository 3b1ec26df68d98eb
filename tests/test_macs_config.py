import hashlib

import numpy as np
import pytest
from pydantic import ValidationError

from dyce.backbones import build_backbone
from dyce.config import ExitConfiguration
from dyce.exits import PAPER_EXIT_KINDS, ExitSet, build_exit
from dyce.macs import count_macs, measure_macs


def test_resnet50_macs_match_torchvision_published_ops():
    from torchvision.models import ResNet50_Weights

    published_gmacs = ResNet50_Weights.IMAGENET1K_V2.meta["_ops"]  # 4.089
    table = measure_macs(build_backbone("resnet50"))
    assert table.total_macs / 1e9 == pytest.approx(published_gmacs, rel=0.01)
    assert table.relative_segments().sum() + table.head_macs / table.total_macs == pytest.approx(1.0)


def test_paper_exit_kinds_and_their_macs():
    import torch

    feature = torch.zeros(1, 64, 7, 7)
    expected_linear_macs = {
        "mlp1": 64 * 10,
        "mlp3x500": 64 * 500 + 500 * 500 + 500 * 10,
        "mlp3x1000": 64 * 1000 + 1000 * 1000 + 1000 * 10,
        "mlp5x500": 64 * 500 + 3 * 500 * 500 + 500 * 10,
        "mlp5x1000": 64 * 1000 + 3 * 1000 * 1000 + 1000 * 10,
    }
    for kind in PAPER_EXIT_KINDS:
        exit_module = build_exit(kind, 64, 10)
        assert exit_module(feature).shape == (1, 10)
        assert count_macs(exit_module, feature) == expected_linear_macs[kind]


def test_path_costs_follow_eq_11():
    backbone = build_backbone("resnet18_fmnist")
    exits = ExitSet.build([s[0] for s in backbone.position_shapes()], 10, ("mlp1", "mlp3x500"))
    table = measure_macs(backbone, exits)
    config = ExitConfiguration(exits=(2, 0, 1, 0, 0, 0, 0, 1), thresholds=(0.5, 1, 0.7, 1, 1, 1, 1, 0))
    costs = table.path_costs(config)
    s = table.relative_segments()
    delta0 = table.exit_macs[0][1] / table.total_macs
    delta2 = table.exit_macs[2][0] / table.total_macs
    assert costs[0] == pytest.approx(s[0] + delta0)
    assert costs[2] == pytest.approx(s[:3].sum() + delta0 + delta2)
    assert costs[-1] == pytest.approx(1.0 + delta0 + delta2)
    assert table.path_costs(ExitConfiguration.final_only(8))[-1] == pytest.approx(1.0)


def test_configuration_is_immutable_hashable_and_round_trips():
    config = ExitConfiguration(exits=(2, 0, 1), thresholds=(0.9, 0.3, 0.0))
    assert config.thresholds[1] == 1.0  # a disabled exit's threshold is canonical
    assert ExitConfiguration.model_validate_json(config.model_dump_json()) == config
    assert len({config, ExitConfiguration(exits=(2, 0, 1), thresholds=(0.9, 0.5, 0.0))}) == 1
    assert config.config_id == ExitConfiguration(exits=(2, 0, 1), thresholds=(0.9, 1.0, 0.0)).config_id
    # Equal configurations share one id, whichever of them was seen first: here -0.0 (equal to 0.0)
    # in a configuration no test has hashed before, so its id is computed, not found in the cache.
    negative_zero = ExitConfiguration(exits=(1, 0, 1), thresholds=(0.123, 1.0, -0.0))
    plain_zero_json = b'{"exits":[1,0,1],"thresholds":[0.123,1.0,0.0]}'
    assert negative_zero.config_id == hashlib.sha256(plain_zero_json).hexdigest()[:12]
    assert ExitConfiguration(exits=(1, 0, 1), thresholds=(0.123, 1.0, 0.0)).config_id == negative_zero.config_id
    # The id is a hash of the configuration as JSON, fixed since banks were first written.
    assert config.config_id == hashlib.sha256(b'{"exits":[2,0,1],"thresholds":[0.9,1.0,0.0]}').hexdigest()[:12]
    with pytest.raises(ValidationError):
        config.exits = (0, 0, 1)


@pytest.mark.parametrize(
    "exits, thresholds",
    [((1, 0), (0.5,)), ((1, 2), (0.5, 0.5)), ((1, 1), (1.5, 0.0)), ((-1, 1), (0.5, 0.0)), ((1, 1), (0.5, 0.2))],
)
def test_invalid_configurations_are_rejected(exits, thresholds):
    with pytest.raises(ValidationError):
        ExitConfiguration(exits=exits, thresholds=thresholds)


def test_configuration_must_name_existing_candidates():
    config = ExitConfiguration(exits=(3, 0, 1), thresholds=(0.5, 1.0, 0.0))
    with pytest.raises(ValueError, match="only 2 candidates"):
        config.check_candidates([2, 2, 1])


def test_final_only_is_the_plain_model():
    config = ExitConfiguration.final_only(4)
    assert config.exits == (0, 0, 0, 1)
    assert np.isclose(config.thresholds[-1], 0.0)
