"""Server-side rules: sample-weighted averaging and which groups each strategy shares."""
import numpy as np
import pytest

from configs import RunConfig
from networks import build
from strategies.aggregation import mean_metrics, weighted_mean
from methods.registry import get_method, method_names


def test_weighted_mean_is_sample_weighted():
    rng = np.random.default_rng(0)
    replies = [{"w": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=5)}
               for _ in range(3)]
    samples = [10, 30, 60]
    out = weighted_mean(replies, samples)
    for key in ("w", "b"):
        expected = sum(n * r[key].astype(np.float64) for n, r in zip(samples, replies)) / sum(samples)
        np.testing.assert_allclose(out[key], expected, rtol=1e-6)
        assert out[key].dtype == replies[0][key].dtype
    # equal weights differ from sample weights: batches are not samples
    assert not np.allclose(weighted_mean(replies, [1, 1, 1])["w"], out["w"])


def test_weighted_mean_rounds_integer_counters():
    out = weighted_mean([{"n": np.array(3)}, {"n": np.array(6)}], [1, 2])
    assert out["n"].dtype.kind == "i" and int(out["n"]) == 5


def test_weighted_mean_rejects_mismatch():
    with pytest.raises(ValueError, match="keys"):
        weighted_mean([{"a": np.zeros(2)}, {"b": np.zeros(2)}], [1, 1])
    with pytest.raises(ValueError, match="shapes"):
        weighted_mean([{"a": np.zeros(2)}, {"a": np.zeros(3)}], [1, 1])
    with pytest.raises(ValueError, match="weights"):
        weighted_mean([{"a": np.zeros(2)}], [0])


def test_mean_metrics_weighted():
    out = mean_metrics([{"loss": 1.0, "x": 5.0}, {"loss": 3.0}], [1, 3])
    assert out == {"loss": pytest.approx(2.5)}


@pytest.mark.parametrize("name, excluded_group", [("FedBN", "bn"), ("FedRep", "out_conv")])
def test_personal_groups_are_not_shared(name, excluded_group):
    model = build("unet_lc_multihead", 1, 2, base_channels=4, aux_channels=8, num_sites=3)
    cfg = RunConfig(strategy=name, num_clients=3)
    strategy = get_method(name).server(cfg)
    keys = strategy.shared_keys(model)
    from networks.groups import parameter_groups

    personal = set(parameter_groups(model)[excluded_group])
    assert personal and not personal & set(keys)
    assert set(strategy.initial_arrays(model)) == set(keys)


def test_local_shares_nothing_and_fedicra_shares_all():
    model = build("unet_lc_multihead", 1, 2, base_channels=4, aux_channels=8, num_sites=3)
    assert get_method("Local").server(RunConfig(strategy="Local")).shared_keys(model) == []
    fedicra = RunConfig(strategy="fedicra")
    assert get_method("fedicra").server(fedicra).shared_keys(model) == list(model.state_dict())


def test_unknown_strategy_lists_names():
    with pytest.raises(ValueError, match="FedICRA"):
        get_method("FedNope")
    assert {"FedAvg", "FedBN", "FedProx", "FedRep", "FedALA", "FedICRA", "Local"} <= set(method_names())


# ---------------------------------------------------------------------- numerical guard
def test_non_finite_or_self_rejected_replies_never_reach_the_aggregate():
    from strategies.base import screen_replies

    good = ({"cid": 0.0, "total": 0.5, "num-examples": 4.0}, {"w": np.ones(3, np.float32)})
    nan_array = ({"cid": 1.0, "total": 0.5, "num-examples": 4.0},
                 {"w": np.array([1.0, np.nan, 0.0], np.float32)})
    inf_loss = ({"cid": 2.0, "total": float("inf"), "num-examples": 4.0}, {"w": np.ones(3, np.float32)})
    rejected = ({"cid": 3.0, "diverged": 1.0, "num-examples": 0.0}, {})
    kept, refused = screen_replies(5, [good, nan_array, inf_loss, rejected])
    assert kept == [0] and sorted(refused) == [1, 2, 3]
    assert "non-finite values in w" in refused[1] and "rejected its own update" in refused[3]


def test_every_client_diverged_stops_the_run():
    from strategies.base import screen_replies

    with pytest.raises(RuntimeError, match="round 7: every client diverged"):
        screen_replies(7, [({"cid": 0.0, "diverged": 1.0}, {}),
                           ({"cid": 1.0, "total": float("nan")}, {"w": np.zeros(1)})])
