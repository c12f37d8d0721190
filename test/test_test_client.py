"""test_client.py: which model is scored, the summary rows, empty maps, one client at a time."""
from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import test_client as tc
from clients.evaluation import predict
from clients.metrics import METRIC_NAMES, binary_metrics
from configs import save_config
from conftest import tiny_run_config
from dataloaders.dataset import SiteDataset
from dataloaders.tasks import get_task
from networks.checkpoint import run_meta, save_atomic
from networks.factory import build_for_run

#: Test cases per site: unequal, so that the mean of sites differs from the pooled mean.
TEST_CASES = (3, 1)


@pytest.fixture
def data_root(tmp_path, make_h5_site) -> Path:
    root = tmp_path / "data"
    for site, n_test in enumerate(TEST_CASES):
        make_h5_site(root, "synthetic_faz", site, n_train=3, n_test=n_test, seed=10 + site)
    return root


def _forced(model: torch.nn.Module, foreground: bool) -> torch.nn.Module:
    """``model`` with its output bias pushed to one class everywhere (a checkable prediction)."""
    with torch.no_grad():
        model.out_conv.weight.zero_()
        model.out_conv.bias.copy_(torch.tensor([-5.0, 5.0] if foreground else [5.0, -5.0]))
    return model


def make_run(tmp_path: Path, data_root: Path, strategy: str, exp: str = "fake/run"):
    """A run folder as training leaves it: config.toml, ``global/best.pt`` holding a model that
    segments everything as foreground, each ``client<k>/best.pt`` one that predicts nothing."""
    cfg = tiny_run_config(data_root, tmp_path / "model", exp=exp, strategy=strategy,
                          model="unet", num_clients=len(TEST_CASES))
    save_config(cfg, cfg.out_dir / "config.toml")
    glob = _forced(build_for_run(cfg), foreground=True)
    arrays = {k: v.detach().clone() for k, v in glob.state_dict().items()}
    save_atomic({"round": 3, "arrays": arrays, "val_dice": 0.5, "meta": run_meta(cfg, None)},
                cfg.out_dir / "global" / "best.pt")
    for cid in range(cfg.num_clients):
        personal = _forced(build_for_run(cfg, site=cid), foreground=False)
        save_atomic({"model": personal.state_dict(), "round": 2, "val_dice": 0.25, "cid": cid,
                     "meta": run_meta(cfg, cid)}, cfg.out_dir / f"client{cid}" / "best.pt")
    return cfg


def run_test(cfg, *flags: str) -> int:
    return tc.main(["--exp", cfg.exp, "--out_root", cfg.out_root, "--device", "cpu",
                    "--no_images", *flags])


def read_csv(path: Path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def saved_model(cfg, cid: int, relative: str) -> torch.nn.Module:
    """Site ``cid``'s network with the weights of checkpoint ``<exp>/<relative>``, read here."""
    state = torch.load(cfg.out_dir / relative, weights_only=False)
    model = build_for_run(cfg, site=cid)
    if "arrays" in state:
        model.load_state_dict({k: torch.as_tensor(v) for k, v in state["arrays"].items()})
    else:
        model.load_state_dict(state["model"])
    return model


def direct_dice(cfg, model: torch.nn.Module, cid: int):
    """Per-case Dice of ``model``'s own predictions on site ``cid``'s test cases."""
    task = get_task(cfg.img_class)
    data = SiteDataset(cfg.root_path, task, cid, "test", val_fraction=cfg.val_fraction, seed=cfg.seed)
    scores = []
    for i in range(len(data)):
        sample = data.sample(i)
        pred = predict(model.eval(), sample["image"][None], cid, cfg.img_size)[0].numpy()
        scores.append(binary_metrics(pred == 1, sample["label"].numpy() == 1)["dice"])
    return scores


@pytest.mark.parametrize("strategy, deploys", [("FedAvg", "global"), ("FedProx", "global"),
                                               ("FedBN", "personal")])
def test_scores_come_from_the_model_the_method_deploys(tmp_path, data_root, caplog, strategy, deploys):
    cfg = make_run(tmp_path, data_root, strategy)
    caplog.set_level(logging.INFO, logger="fedicra.test")
    assert run_test(cfg, "--client", "all") == 0
    rows = read_csv(cfg.out_dir / "test" / "result.csv")
    for cid in range(cfg.num_clients):
        ckpt = "global/best.pt" if deploys == "global" else f"client{cid}/best.pt"
        expected = direct_dice(cfg, saved_model(cfg, cid, ckpt), cid)
        got = [float(r["dice"]) for r in rows if r["client"] == str(cid)]
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
        assert all(r["model"] == deploys and r["checkpoint"] == ckpt
                   for r in rows if r["client"] == str(cid))
        kind = "the global model" if deploys == "global" else "its personalised model"
        round_, val = (3, "0.5000") if deploys == "global" else (2, "0.2500")
        assert f"client {cid}: scoring {kind} {ckpt} (round {round_}, validation Dice {val})" in caplog.text
    # the global model segments everything, the personal ones nothing: the scores tell them apart
    assert all(float(r["dice"]) > 0 for r in rows) == (deploys == "global")


def test_fedavg_scores_equal_the_global_checkpoint_predictions(tmp_path, data_root):
    cfg = make_run(tmp_path, data_root, "FedAvg")
    assert run_test(cfg, "--client", "all") == 0
    rows = read_csv(cfg.out_dir / "test" / "result.csv")
    expected = direct_dice(cfg, saved_model(cfg, 1, "global/best.pt"), 1)
    assert [float(r["dice"]) for r in rows if r["client"] == "1"] == pytest.approx(expected, abs=1e-12)
    assert min(expected) > 0  # the client checkpoints would score 0 everywhere


def test_global_checkpoint_missing_keys_is_an_error_naming_file_and_keys(tmp_path, data_root, caplog):
    cfg = make_run(tmp_path, data_root, "FedAvg")
    path = cfg.out_dir / "global" / "best.pt"
    state = torch.load(path, weights_only=False)
    del state["arrays"]["out_conv.bias"]
    save_atomic(state, path)
    caplog.set_level(logging.INFO, logger="fedicra.test")
    assert run_test(cfg, "--client", "client0") == 2
    assert str(path) in caplog.text and "out_conv.bias" in caplog.text
    with pytest.raises(ValueError, match=r"best\.pt lacks 1 of the model's .* keys .*out_conv\.bias"):
        tc.load_tested_model(cfg, 0, "best", torch.device("cpu"))


def test_latest_global_checkpoint_is_used_with_checkpoint_latest(tmp_path, data_root):
    cfg = make_run(tmp_path, data_root, "FedAvg")
    state = torch.load(cfg.out_dir / "global" / "best.pt", weights_only=False)
    save_atomic({"round": 4, "arrays": state["arrays"], "meta": state["meta"]},
                cfg.out_dir / "global" / "latest.pt")
    assert run_test(cfg, "--client", "all", "--checkpoint", "latest") == 0
    summary = read_csv(cfg.out_dir / "test" / "mean_std_result.csv")
    assert {(s["checkpoint"], s["round"], s["val_dice"]) for s in summary} == {("global/latest.pt", "4", "nan")}


def test_summary_has_site_rows_mean_of_sites_and_pooled(tmp_path, data_root):
    cfg = make_run(tmp_path, data_root, "FedAvg")
    assert run_test(cfg, "--client", "all") == 0
    rows = read_csv(cfg.out_dir / "test" / "result.csv")
    summary = {s["client"]: s for s in read_csv(cfg.out_dir / "test" / "mean_std_result.csv")}
    assert list(summary) == ["client0", "client1", "mean of sites", "pooled"]
    for metric in ("dice", "precision", "jaccard"):
        per_site = [np.mean([float(r[metric]) for r in rows if r["client"] == str(k)])
                    for k in range(len(TEST_CASES))]
        for k, mean in enumerate(per_site):
            assert float(summary[f"client{k}"][f"{metric}_mean"]) == pytest.approx(mean)
            assert int(summary[f"client{k}"]["cases"]) == TEST_CASES[k]
        assert float(summary["mean of sites"][f"{metric}_mean"]) == pytest.approx(np.mean(per_site))
        assert float(summary["mean of sites"][f"{metric}_std"]) == pytest.approx(np.std(per_site))
        pooled = [float(r[metric]) for r in rows]
        assert float(summary["pooled"][f"{metric}_mean"]) == pytest.approx(np.mean(pooled))
    assert summary["mean of sites"]["sites"] == "2" and summary["pooled"]["cases"] == str(sum(TEST_CASES))
    assert summary["mean of sites"]["model"] == "global"
    assert summary["mean of sites"]["checkpoint"] == "global/best.pt"


def test_summarise_weighs_every_site_the_same():
    def row(cid, dice, hd95=1.0):
        values = dict.fromkeys(METRIC_NAMES, 0.5)
        values.update(dice=dice, hd95=hd95)
        return {"run": "r", "client": cid, "model": "personal", "checkpoint": f"client{cid}/best.pt",
                "round": cid + 1, "val_dice": 0.5, "case": "c", "target": "faz", **values}

    rows = [row(0, 1.0), row(0, 0.0, hd95=math.nan), row(0, 0.5), row(1, 0.9)]
    summary = {s["client"]: s for s in tc.summarise(rows)}
    assert summary["client0"]["dice_mean"] == pytest.approx(0.5)
    assert summary["mean of sites"]["dice_mean"] == pytest.approx(0.7)
    assert summary["mean of sites"]["dice_std"] == pytest.approx(0.2)
    assert summary["pooled"]["dice_mean"] == pytest.approx(0.6)
    assert summary["client0"]["hd95_undefined"] == 1 and summary["pooled"]["hd95_undefined"] == 1
    assert summary["mean of sites"]["checkpoint"] == "" and summary["client1"]["round"] == 2
    assert "mean of sites" in tc.format_table(tc.summarise(rows))


def test_empty_prediction_gets_precision_zero():
    truth = np.zeros((8, 8), bool)
    truth[2:5, 2:5] = True
    empty = np.zeros_like(truth)
    m = binary_metrics(empty, truth)
    assert m["precision"] == 0.0 and m["sensitivity"] == 0.0 and m["dice"] == 0.0
    assert math.isnan(m["hd95"]) and math.isnan(m["assd"])
    m = binary_metrics(truth, empty)  # something predicted where there is nothing
    assert m["precision"] == 0.0 and m["sensitivity"] == 0.0 and m["specificity"] < 1.0
    m = binary_metrics(empty, empty)
    assert (m["dice"], m["jaccard"], m["precision"], m["sensitivity"], m["specificity"]) == (1, 1, 1, 1, 1)
    assert (m["hd95"], m["assd"]) == (0.0, 0.0)
    full = np.ones_like(truth)
    assert binary_metrics(full, full)["specificity"] == 1.0  # no background to get wrong


def test_one_client_at_a_time_accumulates(tmp_path, data_root):
    cfg = make_run(tmp_path, data_root, "FedBN")
    test_dir = cfg.out_dir / "test"
    assert run_test(cfg, "--client", "client0") == 0
    assert {r["client"] for r in read_csv(test_dir / "result.csv")} == {"0"}
    assert run_test(cfg, "--client", "client1", "--cid", "1") == 0
    assert run_test(cfg, "--client", "client0") == 0  # testing again replaces, never duplicates
    rows = read_csv(test_dir / "result.csv")
    assert [r["client"] for r in rows] == ["0"] * TEST_CASES[0] + ["1"] * TEST_CASES[1]
    summary = [s["client"] for s in read_csv(test_dir / "mean_std_result.csv")]
    assert summary == ["client0", "client1", "mean of sites", "pooled"]


def test_results_of_another_run_are_replaced(tmp_path, data_root):
    first = make_run(tmp_path, data_root, "FedBN", exp="fake/first")
    second = make_run(tmp_path, data_root, "FedBN", exp="fake/second")
    shared = tmp_path / "shared_out"
    assert run_test(first, "--client", "client1", "--output", str(shared)) == 0
    assert run_test(second, "--client", "client0", "--output", str(shared)) == 0
    assert {r["client"] for r in read_csv(shared / "result.csv")} == {"0"}


# ---------------------------------------------------------------------- safe loading
class _Payload:
    """Unpickling this object would create a marker file (stands for arbitrary code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_with_a_code_payload_is_refused_without_running_it(tmp_path, data_root, caplog):
    cfg = make_run(tmp_path, data_root, "FedBN")
    marker = tmp_path / "code_ran"
    path = cfg.out_dir / "client0" / "best.pt"
    state = torch.load(path, weights_only=True)
    state["extra"] = _Payload(marker)
    torch.save(state, path)
    caplog.set_level(logging.INFO, logger="fedicra.test")
    assert run_test(cfg, "--client", "client0") == 2
    assert not marker.exists(), "loading the checkpoint ran code"
    assert str(path) in caplog.text and "refused" in caplog.text


def test_a_checkpoint_of_another_client_is_refused(tmp_path, data_root, caplog):
    cfg = make_run(tmp_path, data_root, "FedBN")
    import shutil

    shutil.copy(cfg.out_dir / "client1" / "best.pt", cfg.out_dir / "client0" / "best.pt")
    caplog.set_level(logging.INFO, logger="fedicra.test")
    assert run_test(cfg, "--client", "client0") == 2
    assert "client0/best.pt" in caplog.text and "client 1 (expected 0)" in caplog.text


def test_a_checkpoint_of_another_model_names_the_file(tmp_path, data_root, caplog):
    cfg = make_run(tmp_path, data_root, "FedBN")
    other = tiny_run_config(data_root, tmp_path / "other", strategy="FedBN", model="unet",
                            base_channels=8, num_clients=len(TEST_CASES))
    path = cfg.out_dir / "client0" / "best.pt"
    save_atomic({"model": build_for_run(other, site=0).state_dict(), "round": 1,
                 "meta": run_meta(cfg, 0)}, path)
    caplog.set_level(logging.INFO, logger="fedicra.test")
    assert run_test(cfg, "--client", "client0") == 2
    assert f"{path} does not fit the model" in caplog.text and "Traceback" not in caplog.text


def test_a_copied_run_folder_is_scored_where_it_is(tmp_path, data_root):
    """Issue 19, finding 5: ``--exp pk`` on a copy of run ``fake/run`` followed the ``exp`` in
    the copy's config.toml, so it scored, and wrote into, the original folder."""
    import shutil

    cfg = make_run(tmp_path, data_root, "FedBN", exp="fake/run")
    copy = tmp_path / "model" / "pk"
    shutil.copytree(cfg.out_dir, copy)
    # the copy's personal models segment everything, the original's nothing: the scores say
    # which checkpoints were read
    for cid in range(cfg.num_clients):
        path = copy / f"client{cid}" / "best.pt"
        state = torch.load(path, weights_only=True)
        state["model"] = _forced(build_for_run(cfg, site=cid), foreground=True).state_dict()
        save_atomic(state, path)
    original = {p: p.stat().st_mtime_ns for p in cfg.out_dir.rglob("*")}
    assert tc.main(["--exp", "pk", "--out_root", str(tmp_path / "model"), "--device", "cpu",
                    "--no_images", "--client", "all"]) == 0
    rows = read_csv(copy / "test" / "result.csv")
    assert len(rows) == sum(TEST_CASES) and all(float(r["dice"]) > 0 for r in rows)
    assert {r["run"] for r in rows} == {str(copy.resolve())}
    assert (copy / "test" / "mean_std_result.csv").is_file()
    assert not (cfg.out_dir / "test").exists(), "results were written into the original"
    assert {p: p.stat().st_mtime_ns for p in cfg.out_dir.rglob("*")} == original
