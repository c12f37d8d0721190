"""Round overhead of the deployment mode against the simulation: wall time minus training time.

Runs ``flower_runner.py`` on a tiny synthetic federation in each requested arrangement and
watches ``metrics.csv`` (written by the server after each round) to time every round. For
round ``r >= 2`` (round 1 includes start-up):

    overhead(r) = (time round r completed - time round r-1 completed) - max_k seconds_k(r)

where ``seconds_k(r)`` is the training time client ``k`` reports for round ``r`` (local
update, validation and checkpoint, measured inside the trainer). The clients train in
parallel, so the slowest one bounds the round.

    python benchmarks/bench_round_overhead.py                   # all arrangements
    python benchmarks/bench_round_overhead.py --arrangements deployment --rounds 4
"""
from __future__ import annotations

import argparse
import csv
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Tuple

REPO = Path(__file__).resolve().parents[1]

#: name -> extra flower_runner flags
ARRANGEMENTS = {
    "simulation": ["--mode", "simulation"],
    # the default: persistent ClientApp executor, packed arrays, 0.1 s polls
    "deployment": ["--mode", "deployment"],
    # Flower's per-message flwr-clientapp process, otherwise as the default
    "deployment-subprocess": ["--mode", "deployment", "--clientapp-exec", "subprocess"],
    # Flower's own behaviour throughout (only the bridge and the persistent worker remain)
    "deployment-flower-defaults": ["--mode", "deployment", "--clientapp-exec", "subprocess",
                                   "--poll-interval", "0", "--no-pack"],
}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def read_rounds(path: Path, clients: int) -> Dict[int, List[float]]:
    """round -> the clients' 'seconds' (only rounds with a row for every client)."""
    rounds: Dict[int, List[float]] = {}
    try:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                if row.get("seconds"):
                    rounds.setdefault(int(row["round"]), []).append(float(row["seconds"]))
    except (OSError, ValueError, csv.Error):
        return {}
    return {r: s for r, s in rounds.items() if len(s) >= clients}


def run_one(name: str, flags: List[str], args: argparse.Namespace, data: Path, out: Path
            ) -> Tuple[List[float], List[float], float, str]:
    """Run one arrangement; return per-round walls, per-round max seconds, total, command."""
    cmd = [sys.executable, "flower_runner.py", "--img_class", "synthetic_faz", "--root_path",
           str(data), "--num_clients", str(args.clients), "--rounds", str(args.rounds),
           "--iters", str(args.iters), "--rep_iters", "1", "--batch_size", "2", "--procedure",
           "pce", "--set", "base_channels=4", "--set", "aux_channels=8", "--set",
           f"eval_every={args.rounds}", "--port", str(args.port), "--out_root", str(out),
           "--exp", name, "--overwrite", *flags]
    metrics = out / name / "metrics.csv"
    done: Dict[int, float] = {}
    start = time.perf_counter()
    with open(out / f"{name}.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            now = time.perf_counter()
            for r in read_rounds(metrics, args.clients):
                done.setdefault(r, now)
            time.sleep(0.02)
    total = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed with code {proc.returncode}; see {out / (name + '.log')}")
    seconds = read_rounds(metrics, args.clients)
    walls, trains = [], []
    for r in range(2, args.rounds + 1):
        walls.append(done[r] - done[r - 1])
        trains.append(max(seconds[r]))
    return walls, trains, total, shlex.join(cmd)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arrangements", nargs="+", default=list(ARRANGEMENTS),
                   choices=list(ARRANGEMENTS))
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--port", type=int, default=18200, help="base port of the deployment runs")
    p.add_argument("--out", type=Path, default=None, help="work folder (default: a temp dir)")
    args = p.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="bench_round_"))
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    subprocess.run([sys.executable, "-m", "dataloaders.synthetic", "--task", "faz", "--out",
                    str(data), "--size", "32", "--train-per-site", "6", "--test-per-site", "2",
                    "--seed", "1"], cwd=REPO, check=True, capture_output=True)
    rows = []
    for name in args.arrangements:
        walls, trains, total, cmd = run_one(name, ARRANGEMENTS[name], args, data, out)
        over = [w - t for w, t in zip(walls, trains)]
        rows.append((name, statistics.median(walls), statistics.median(trains),
                     statistics.median(over), max(over), total))
        print(f"{name}: {cmd}", flush=True)
    print(f"\n{args.clients} clients, {args.rounds} rounds x {args.iters} iterations, 32 px, "
          f"base_channels 4; rounds 2..{args.rounds}; {cpu_name()}, "
          f"{len(__import__('os').sched_getaffinity(0))} cores\n")
    print("| arrangement | round wall (median, s) | slowest client training (median, s) "
          "| overhead (median, s) | overhead (max, s) | whole run (s) |")
    print("|---|---|---|---|---|---|")
    for name, wall, train, over, worst, total in rows:
        print(f"| {name} | {wall:.2f} | {train:.2f} | {over:.2f} | {worst:.2f} | {total:.1f} |")
    print(f"\ncommand: python benchmarks/bench_round_overhead.py "
          f"{' '.join(sys.argv[1:] if argv is None else argv)}".rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
