import numpy as np
import pytest

from dyce.config import ExitConfiguration
from dyce.macs import MacTable
from dyce.simulate import ExitRecords, simulate


def hand_made():
    # 3 positions (2 early + final), 1 candidate each early, 5 samples.
    confidence = np.array(
        [
            [[0.9, 0.2, 0.6, 0.5, 0.95]],
            [[0.3, 0.8, 0.7, 0.4, 0.1]],
            [[0.5, 0.5, 0.5, 0.5, 0.5]],
        ],
        dtype=np.float32,
    )
    correct = np.array(
        [
            [[True, False, False, True, True]],
            [[False, True, True, False, False]],
            [[True, True, False, True, True]],
        ]
    )
    macs = MacTable(segment_macs=(30, 30, 30), head_macs=10, exit_macs=((5,), (10,), ()))
    return ExitRecords(confidence, correct, (1, 1, 1)), macs


def test_simulation_against_a_hand_computation():
    records, macs = hand_made()
    config = ExitConfiguration(exits=(1, 1, 1), thresholds=(0.9, 0.7, 0.0))
    result = simulate(records, config, macs)
    # Position 0 (t=0.9): samples 0 and 4 (0.9 >= 0.9 exits). Position 1 (t=0.7): samples 1, 2.
    # Final: sample 3.
    assert result.exit_positions.tolist() == [0, 1, 1, 2, 0]
    assert result.exit_counts.tolist() == [2, 2, 1]
    assert result.correct_counts.tolist() == [2, 2, 1]
    assert result.accuracy == pytest.approx(1.0)
    assert records.original_accuracy == pytest.approx(0.8)
    assert result.relative_accuracy == pytest.approx(1.0 / 0.8)
    # Costs per exit position, in MACs of a total of 100: 35, 75, 115.
    assert result.relative_macs == pytest.approx((2 * 0.35 + 2 * 0.75 + 1 * 1.15) / 5)


def test_disabled_exits_cost_nothing_and_exit_nobody():
    records, macs = hand_made()
    result = simulate(records, ExitConfiguration(exits=(0, 1, 1), thresholds=(1.0, 0.75, 0.0)), macs)
    assert result.exit_positions.tolist() == [2, 1, 2, 2, 2]
    assert result.relative_macs == pytest.approx((0.7 + 4 * 1.1) / 5)
    assert result.accuracy == pytest.approx(0.8)


def test_mismatched_configuration_is_refused():
    records, macs = hand_made()
    with pytest.raises(ValueError):
        simulate(records, ExitConfiguration(exits=(0, 1), thresholds=(1.0, 0.0)), macs)
    with pytest.raises(ValueError):
        simulate(records, ExitConfiguration(exits=(2, 0, 1), thresholds=(0.5, 1.0, 0.0)), macs)
