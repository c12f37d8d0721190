"""Overlay pictures: prediction tint plus the ground-truth contour."""
import numpy as np

from clients.overlay import CONTOUR_COLOUR, contour, overlay


def test_contour_is_the_inner_boundary_of_a_square():
    mask = np.zeros((7, 7), bool)
    mask[1:6, 1:6] = True
    edge = contour(mask)
    expected = mask.copy()
    expected[2:5, 2:5] = False
    np.testing.assert_array_equal(edge, expected)


def test_overlay_draws_the_truth_contour_over_the_prediction():
    image = np.full((8, 8), 0.5, np.float32)
    pred = np.zeros((8, 8), np.int64)
    pred[2:6, 2:6] = 1
    truth = np.zeros((8, 8), np.int64)
    truth[1:7, 1:7] = 1
    truth[0, 0] = 2  # unlabelled value (num_classes = 2): ignored
    rgb = overlay(image, pred, truth, num_classes=2)
    assert rgb.shape == (8, 8, 3) and rgb.dtype == np.uint8
    edge = contour(truth == 1)
    assert (rgb[edge] == CONTOUR_COLOUR).all()
    assert (rgb[3, 3] != rgb[0, 7]).any()  # tinted prediction differs from plain grey
    assert tuple(rgb[0, 0]) == (127, 127, 127)


def test_end_of_run_summary_names_each_site_best_round(tmp_path):
    from configs.metrics_csv import CSV_COLUMNS, summary_table

    rows = [(1, 0, 0.5, ""), (1, 1, 0.7, ""), (2, 0, 0.6, 0.4), (2, 1, 0.65, 0.5), (3, 0, 0.55, 0.6),
            (3, 1, 0.66, 0.7)]
    lines = [",".join(CSV_COLUMNS)]
    for rnd, client, val, glob in rows:
        values = {"round": rnd, "client": client, "val_dice": val, "val_dice_global": glob}
        lines.append(",".join(str(values.get(c, "")) for c in CSV_COLUMNS))
    path = tmp_path / "metrics.csv"
    path.write_text("\n".join(lines) + "\n")
    table = summary_table(path)
    assert "     0 | 0.6000 | 2" in table and "     1 | 0.7000 | 1" in table
    assert "mean | 0.6500" in table
    assert "best mean validation Dice 0.6500 (aggregate of round 2" in table
