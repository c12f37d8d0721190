"""Speed features that must not change results: prefetched batches, bf16 autocast, the loop's
deferred loss transfer, and the train-step benchmark's plumbing."""
import numpy as np
import pytest
import torch

from benchmarks.bench_train_step import AMP_ATOL, AMP_RTOL, amp_agreement, parse_args
from clients.trainer import SiteTrainer
from configs import RunConfig
from conftest import tiny_run_config
from dataloaders.dataset import InfiniteBatches, PrefetchBatches, SiteDataset


def assert_same_batch(a, b):
    assert a["case"] == b["case"]
    for key in ("image", "label", "mask"):
        assert torch.equal(a[key], b[key]), key


@pytest.fixture
def site(tmp_path, make_h5_site):
    make_h5_site(tmp_path, "faz", site=0, n_train=6, n_test=1, size=16)
    return SiteDataset(tmp_path, "faz", 0, "train", augment=True)  # 5 cases


# ---------------------------------------------------------------- prefetching stream

def test_prefetching_stream_yields_the_synchronous_batches(site):
    plain = InfiniteBatches(site, 3, seed=5)
    ahead = PrefetchBatches(InfiniteBatches(site, 3, seed=5), depth=2)
    for _ in range(7):  # across several epochs of 5 cases
        assert_same_batch(next(ahead), next(plain))
        assert ahead.state_dict() == plain.state_dict()
    ahead.close()


@pytest.mark.parametrize("depth", [1, 3])
def test_prefetching_stream_resumes_from_its_state(site, depth):
    plain = InfiniteBatches(site, 4, seed=1)
    ahead = PrefetchBatches(InfiniteBatches(site, 4, seed=1), depth=depth)
    for _ in range(3):
        next(plain), next(ahead)
    state = ahead.state_dict()  # batches 4.. are already in flight: the state is the consumer's
    expected = [next(plain) for _ in range(4)]
    resumed = PrefetchBatches(InfiniteBatches(site, 4, seed=99), depth=depth)
    resumed.load_state_dict(state)
    synchronous = InfiniteBatches(site, 4, seed=98)
    synchronous.load_state_dict(state)  # the formats are interchangeable
    for batch in expected:
        assert_same_batch(next(resumed), batch)
        assert_same_batch(next(synchronous), batch)
    # restoring drops the batches in flight
    ahead.load_state_dict(state)
    for batch in expected:
        assert_same_batch(next(ahead), batch)
    for stream in (ahead, resumed):
        stream.close()


def test_bad_prefetch_values_are_refused(site):
    with pytest.raises(ValueError, match="prefetch depth"):
        PrefetchBatches(InfiniteBatches(site, 2), depth=0)
    with pytest.raises(ValueError, match="prefetch"):
        RunConfig(prefetch=-1).validate()


def test_trainer_with_and_without_prefetching_trains_identically(tiny_federation, tmp_path):
    results = []
    for prefetch in (0, 2):
        cfg = tiny_run_config(tiny_federation, tmp_path / f"p{prefetch}", prefetch=prefetch)
        trainer = SiteTrainer(cfg, cid=1)
        metrics = [trainer.run_iterations(2, lambda n: True) for _ in range(2)]
        weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        results.append((metrics, weights, trainer.state_dict()["batches"]))
        trainer.close()
    (m0, w0, s0), (m1, w1, s1) = results
    assert m0 == m1
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert s0 == s1


# ---------------------------------------------------------------- the loop's logging

class Recorder:
    def __init__(self):
        self.scalars = []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def flush(self):
        pass

    def close(self):
        pass


def test_loss_scalars_are_written_per_step_and_averaged(tiny_federation, tmp_path):
    trainer = SiteTrainer(tiny_run_config(tiny_federation, tmp_path, prefetch=0), cid=0)
    trainer._writer = Recorder()
    metrics = trainer.run_iterations(3, lambda n: True)
    totals = [(v, s) for tag, v, s in trainer._writer.scalars if tag == "loss/total"]
    assert [s for _, s in totals] == [1, 2, 3]
    assert all(isinstance(v, float) for v, _ in totals)
    assert metrics["total"] == pytest.approx(np.mean([v for v, _ in totals]), rel=1e-12)
    assert [s for tag, _, s in trainer._writer.scalars if tag == "lr"] == [1, 2, 3]


# ---------------------------------------------------------------- mixed precision

def test_amp_losses_agree_with_float32(tiny_federation, tmp_path):
    """bf16 autocast (CPU here; the same code path as CUDA) against float32, same weights and
    batches: every loss term within |amp - fp32| <= AMP_RTOL |fp32| + AMP_ATOL."""
    cfg = tiny_run_config(tiny_federation, tmp_path, procedure="pce_gatedcrf_mstree",
                          base_channels=8, aux_channels=16, batch_size=4, prefetch=0)
    trainer = SiteTrainer(cfg, cid=2)
    rows = amp_agreement(trainer, batches=3)
    assert {r["term"] for r in rows} == {"pce", "tree", "crf", "sc", "total"}
    bad = [r for r in rows if not r["ok"]]
    assert not bad, f"outside {AMP_RTOL} relative + {AMP_ATOL} absolute: {bad}"
    assert any(r["abs_diff"] > 0 for r in rows), "autocast did not change anything: not active?"


def test_amp_training_keeps_float32_weights_and_finite_losses(tiny_federation, tmp_path):
    cfg = tiny_run_config(tiny_federation, tmp_path, procedure="pce_gatedcrf_mstree", amp=True)
    trainer = SiteTrainer(cfg, cid=0)
    metrics = trainer.run_iterations(2, lambda n: True)
    assert all(np.isfinite(v) for v in metrics.values())
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())


def test_amp_key_type_is_checked():
    with pytest.raises(ValueError, match="'amp'"):
        RunConfig.from_mapping({"amp": "yes"})


# ---------------------------------------------------------------- benchmark plumbing

def test_benchmark_flags_are_checked():
    with pytest.raises(SystemExit):
        parse_args(["--device", "cpu", "--batch", "0"])
    with pytest.raises(SystemExit):
        parse_args(["--device", "cpu", "--clients", "6"])
    args = parse_args(["--device", "cpu", "--task", "odoc"])
    assert (args.size, args.steps, args.round_iters) == (384, 2, 1)
