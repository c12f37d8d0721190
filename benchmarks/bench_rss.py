"""Resident memory (RSS) of every deployment process across many rounds.

Runs ``flower_runner.py --mode deployment`` on a tiny synthetic federation (``--clients``
sites, 32 px, ``base_channels=4``) and, each time ``metrics.csv`` shows a completed round,
reads ``VmRSS`` from ``/proc/<pid>/status`` of the runner, of every child listed in the run's
``pids.json`` (SuperLink, SuperNodes, ClientApp executors, site workers, ``flwr run``) and of
their descendants (the SuperLink's SuperExec and the run's ServerApp). Every ``--interval``
seconds it also samples, to keep each process's peak. Flower is imported only by the runner
and its children.

    python benchmarks/bench_rss.py --clients 10 --rounds 40 --out /tmp/bench_rss

Prints, per kind of process, the mean RSS per process after round 1 and at a few later
rounds, the growth from round 1 to the last round (mean and the largest single process), and
the peak; then the exact runner command and the device.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Tuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def rss_kb(pid: int) -> Optional[int]:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def children_of() -> Dict[int, List[int]]:
    """ppid -> pids of every process now running."""
    tree: Dict[int, List[int]] = defaultdict(list)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree[ppid].append(int(entry.name))
    return tree


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def kind_of(name: str, cmd: str) -> str:
    """Group label: ``worker3`` -> ``worker``; descendants by their command."""
    if "flwr-serverapp" in cmd:
        return "ServerApp (flwr-serverapp)"
    if "flower-superexec" in cmd:
        return "SuperExec of the SuperLink"
    if "flwr-clientapp" in cmd:
        return "flwr-clientapp"
    return {"superlink": "SuperLink", "supernode": "SuperNode", "appexec": "ClientApp executor",
            "worker": "site worker", "flwr-run": "flwr run"}.get(re.sub(r"\d+$", "", name), name)


def sample(runner: int, pid_file: Path) -> Dict[Tuple[str, int], int]:
    """``{(kind, pid): RSS in kB}`` of the runner, its listed children and their descendants."""
    from deployment.processes import recorded_pids

    try:
        listed = recorded_pids(pid_file)
    except (OSError, ValueError):
        listed = {}
    tree = children_of()
    found: Dict[Tuple[str, int], int] = {}
    value = rss_kb(runner)
    if value:
        found[("runner (flower_runner.py)", runner)] = value
    for name, pid in listed.items():
        stack = [(name, int(pid))]
        while stack:
            label, p = stack.pop()
            value = rss_kb(p)
            if value:
                found[(kind_of(label, cmdline(p)), p)] = value
            stack += [(f"{label}-child", c) for c in tree.get(p, [])]
    return found


def completed_rounds(path: Path, clients: int) -> int:
    counts: Dict[int, int] = defaultdict(int)
    try:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                counts[int(row["round"])] += 1
    except (OSError, ValueError, KeyError, csv.Error):
        return 0
    done = 0
    while counts.get(done + 1, 0) >= clients:
        done += 1
    return done


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--size", type=int, default=32, help="image side in px")
    p.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "bench_rss")
    p.add_argument("--port", type=int, default=0, help="base port (0: a free block)")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between peak samples")
    p.add_argument("--max-minutes", type=float, default=0,
                   help="stop the run (SIGINT) after this long and report the rounds done so "
                        "far (0: no limit)")
    p.add_argument("--report-rounds", type=int, nargs="*", default=None,
                   help="rounds shown as columns (default: 1, a quarter, half, 3/4, last)")
    args = p.parse_args(argv)

    from dataloaders.synthetic import generate_federation
    from deployment.processes import free_port_base

    data = args.out / "data"
    if not (data / f"Domain{args.clients}").is_dir():
        generate_federation("faz", data, size=args.size, train_per_site=4, test_per_site=1,
                            seed=1, sites=args.clients)
    port = args.port or free_port_base(2 * args.clients + 2)
    cmd = [sys.executable, "flower_runner.py", "--mode", "deployment", "--img_class",
           "synthetic_faz", "--root_path", str(data), "--num_clients", str(args.clients),
           "--rounds", str(args.rounds), "--iters", str(args.iters), "--rep_iters", "1",
           "--batch_size", "2", "--procedure", "pce", "--img_size", str(args.size), "--set",
           "base_channels=4", "--set", "aux_channels=8", "--set", "ala_max_epochs=2",
           "--port", str(port), "--out_root", str(args.out / "model"), "--exp", "rss",
           "--overwrite"]
    run_dir = args.out / "model" / "rss"
    per_round: Dict[int, Dict[Tuple[str, int], int]] = {}
    peak: Dict[Tuple[str, int], int] = {}
    started = time.perf_counter()
    with open(args.out / "runner.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        last_peak = 0.0
        stopped = False
        while proc.poll() is None:
            if args.max_minutes and not stopped and \
                    time.perf_counter() - started > 60 * args.max_minutes:
                proc.send_signal(signal.SIGINT)  # the runner stops every child
                stopped = True
            done = completed_rounds(run_dir / "metrics.csv", args.clients)
            if done and done not in per_round:
                per_round[done] = sample(proc.pid, run_dir / "pids.json")
            if time.perf_counter() - last_peak >= args.interval:
                last_peak = time.perf_counter()
                for key, value in sample(proc.pid, run_dir / "pids.json").items():
                    peak[key] = max(peak.get(key, 0), value)
            time.sleep(0.2)
    total = time.perf_counter() - started
    if (proc.returncode != 0 and not stopped) or not per_round:
        print(f"runner exited with {proc.returncode}; see {args.out / 'runner.log'}")
        return 1
    last = max(per_round)
    shown = args.report_rounds or sorted({1, max(1, last // 4), max(1, last // 2),
                                          max(1, 3 * last // 4), last})
    shown = [r for r in shown if r in per_round]
    kinds = sorted({k for snap in per_round.values() for k, _ in snap})

    def mean_mb(snap: Dict[Tuple[str, int], int], kind: str) -> float:
        values = [v for (k, _), v in snap.items() if k == kind]
        return sum(values) / len(values) / 1024 if values else float("nan")

    header = (["process", "count"] + [f"round {r} (MB)" for r in shown]
              + [f"growth r{shown[0]}->r{last} mean / max (MB)", "peak (MB)"])
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for kind in kinds:
        first, end = per_round[shown[0]], per_round[last]
        pids = sorted({pid for (k, pid) in end if k == kind})
        growth = [(end[(kind, pid)] - first[(kind, pid)]) / 1024 for pid in pids
                  if (kind, pid) in first]
        g = (f"{sum(growth) / len(growth):+.1f} / {max(growth, key=abs):+.1f}" if growth
             else "n/a (new process)")
        top = max((v for (k, _), v in peak.items() if k == kind), default=0) / 1024
        cells = [kind, str(len(pids))] + [f"{mean_mb(per_round[r], kind):.0f}" for r in shown]
        print("| " + " | ".join(cells + [g, f"{top:.0f}"]) + " |")
    totals = {r: sum(per_round[r].values()) / 1024 for r in shown}
    print("| **all** | " + str(len(per_round[last])) + " | "
          + " | ".join(f"{totals[r]:.0f}" for r in shown)
          + f" | {totals[last] - totals[shown[0]]:+.0f} (sum) | |")
    print()
    print(f"{args.clients} clients x {last} rounds in {total:.0f} s "
          f"(exit code {proc.returncode}{', stopped at --max-minutes' if stopped else ''}); device: {os.cpu_count()}-core CPU ({cpu_name()}), "
          f"load average at the end {os.getloadavg()[0]:.1f}; {datetime.date.today()}")
    print("runner command: " + " ".join(shlex.quote(c) for c in cmd))
    return 0


if __name__ == "__main__":
    sys.exit(main())
