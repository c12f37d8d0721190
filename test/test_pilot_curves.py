"""The converged protocol's length rule, on fabricated validation curves."""
import csv

from benchmarks.pilot_curves import curve, length_rule


def test_length_rule_takes_the_first_length_where_every_curve_is_within_001_of_its_best():
    flat_by_20 = {r: min(0.8, 0.04 * r) for r in range(1, 41)}
    flat_by_30 = {r: min(0.9, 0.03 * r) for r in range(1, 41)}
    rising = {r: 0.02 * r for r in range(1, 41)}
    assert length_rule([flat_by_20]) == 20
    assert length_rule([flat_by_20, flat_by_30]) == 30
    assert length_rule([flat_by_20, rising]) == 40
    assert length_rule([{r: 0.5 for r in range(1, 12)}]) is None  # stopped before 20 rounds


def test_curve_reads_the_blend_validation_as_the_previous_round(tmp_path):
    path = tmp_path / "metrics.csv"
    with open(path, "w", newline="") as f:
        out = csv.DictWriter(f, ["round", "client", "val_dice", "val_dice_blend"])
        out.writeheader()
        out.writerows([{"round": 1, "client": 0, "val_dice": 0.2, "val_dice_blend": ""},
                       {"round": 3, "client": 0, "val_dice": "", "val_dice_blend": 0.7},
                       {"round": 3, "client": -1, "val_dice": 0.9, "val_dice_blend": ""}])
    assert curve(path) == {1: {0: 0.2}, 2: {0: 0.7}}
