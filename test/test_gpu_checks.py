"""The prepared GPU script (benchmarks/gpu_checks.sh) runs its steps, at toy sizes on the CPU.

A GPU lease is short: a flag the script passes that a benchmark no longer accepts would
waste it. QUICK=1 runs the same commands with toy sizes on the CPU.
"""
import os
import subprocess
import sys

from conftest import REPO


def test_gpu_script_runs_its_steps_and_respects_the_budget(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path / "out"), QUICK="1", BUDGET="200", PYTHON=sys.executable,
               STEPS="faz losses faz_amp odoc")
    done = subprocess.run(["bash", "benchmarks/gpu_checks.sh"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = (tmp_path / "out" / "summary.log").read_text()
    for name in ("faz", "losses", "faz_amp", "odoc"):
        assert f"== {name}: rc 0," in summary, summary
    assert "== tests:" not in summary and "== layout:" not in summary  # not in STEPS
    faz = (tmp_path / "out" / "faz.log").read_text()
    assert "| sequential reference" in faz and "## Federated round" in faz
    assert "within tolerance" in (tmp_path / "out" / "faz_amp.log").read_text()

    env.update(BUDGET="10", STEPS="faz")  # less left than the step's limit: skipped, not cut
    done = subprocess.run(["bash", "benchmarks/gpu_checks.sh"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    assert "== faz: skipped" in (tmp_path / "out" / "summary.log").read_text()


def test_gpu_modules_import_neither_flower_nor_the_toml_writer():
    """The GPU machine has torch, numpy, scipy, h5py, scikit-image, pytest; no flwr, no tomli_w."""
    code = ("import sys, benchmarks.bench_train_step, benchmarks.bench_losses, configs; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('flwr', 'tomli_w')); "
            "print(bad); sys.exit(bool(bad))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
