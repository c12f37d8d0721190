"""The reports of a comparison folder ``DIR`` (``comparison.csv``, ``comparison.md``,
``comparison_per_seed.csv``, ``val_dice.png``), read from its finished runs: per-seed rows,
mean ± std over seeds, the paired Wilcoxon test against the reference row, Δ by seed and the
count of lost site replies. What each file holds is described in
:mod:`benchmarks.compare_strategies`."""
from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from methods.registry import get_method

from .compared_methods import Method, all_methods, result_dir, run_dir, snapshot_seed

log = logging.getLogger("fedicra.compare")


# ---------------------------------------------------------------------- reading results
def read_csv(path: Path) -> List[Dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def lost_replies(folder: Path) -> int:
    """How many site replies the run in ``folder`` trained without: the ``metrics.csv`` rows
    with ``missing = 1`` (a site that missed a round's deadline or failed; the round was
    aggregated without it). A run that lost none is what a run alone would compute; one that
    lost some depends on the load of the machine it ran on."""
    path = folder / "metrics.csv"
    if not path.is_file():
        return 0
    return sum(1 for r in read_csv(path) if r.get("missing") not in (None, "", "0"))


def result_rows(out: Path, method: Method, seed: Optional[int] = None) -> List[Dict[str, object]]:
    """``comparison.csv`` rows of one tested method (and seed): std over the test cases."""
    folder = result_dir(out, method, seed)
    if folder is None:
        raise FileNotFoundError(f"{run_dir(out, method, seed)} holds no test results")
    record = json.loads((folder / "compare.json").read_text())
    lost = lost_replies(folder)
    if lost:
        log.warning("%s trained without %d site replies (metrics.csv, missing = 1): its values "
                    "depend on the machine's load; rerun it with a longer round_timeout", folder,
                    lost)
    run_seed = seed if seed is not None else snapshot_seed(folder)
    rows = []
    for r in read_csv(folder / "test" / "mean_std_result.csv"):
        def num(key: str) -> float:
            return float(r[key]) if r.get(key) not in (None, "") else math.nan

        rows.append({"method": method.label, "site": r["client"], "target": r["target"],
                     "model": r["model"], "dice_mean": num("dice_mean"),
                     "dice_std": num("dice_std"), "hd95_mean": num("hd95_mean"),
                     "hd95_std": num("hd95_std"), "cases": r.get("cases", ""),
                     "train_seconds": float(record["train_seconds"]), "lost_replies": lost,
                     "seeds": "" if run_seed is None else str(run_seed)})
    return rows


CaseKey = Tuple[int, str, str]  # (client, case, target)


def case_dice(folders: Sequence[Path]) -> Dict[CaseKey, float]:
    """Per-case test Dice of the runs ``folders`` (``test/result.csv``), each case's Dice
    averaged over the runs (the seeds) where it is defined; NaN where it is nowhere."""
    values: Dict[CaseKey, List[float]] = {}
    for folder in folders:
        path = folder / "test" / "result.csv"
        if not path.is_file():
            log.warning("%s is missing: its run is left out of the paired test", path)
            continue
        for r in read_csv(path):
            dice = float(r["dice"]) if r.get("dice") not in (None, "") else math.nan
            values.setdefault((int(r["client"]), r["case"], r["target"]), []).append(dice)
    out: Dict[CaseKey, float] = {}
    for key, dices in values.items():
        defined = [d for d in dices if not math.isnan(d)]
        out[key] = sum(defined) / len(defined) if defined else math.nan
    return out


def paired_wilcoxon(reference: Mapping[CaseKey, float], other: Mapping[CaseKey, float],
                    keys: Optional[Sequence[CaseKey]] = None) -> Tuple[float, int]:
    """Two-sided Wilcoxon signed-rank p-value of ``other`` against ``reference`` over the
    cases both define (``keys``: only those), and the number of pairs. p = 1 where every
    difference is zero; NaN without pairs."""
    import warnings

    from scipy.stats import wilcoxon

    keys = [k for k in (keys if keys is not None else sorted(reference)) if k in reference
            and k in other and not math.isnan(reference[k]) and not math.isnan(other[k])]
    if not keys:
        return math.nan, 0
    x = [other[k] for k in keys]
    y = [reference[k] for k in keys]
    if all(a == b for a, b in zip(x, y)):
        return 1.0, len(keys)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            p = float(wilcoxon(x, y, alternative="two-sided").pvalue)
        except ValueError:  # scipy versions that refuse all-zero differences after all
            p = 1.0
    return (1.0 if math.isnan(p) else p), len(keys)


def add_wilcoxon(rows: Sequence[Dict[str, object]], cases: Mapping[str, Mapping[CaseKey, float]],
                 reference: str) -> None:
    """Fill ``wilcoxon_ref``, ``wilcoxon_p`` and ``wilcoxon_pairs`` of ``rows`` (per method: its
    per-case Dice ``cases[method]``): a site row pairs that site's cases, ``mean of sites`` and
    ``pooled`` every case of the target. The reference's own rows keep an empty p."""
    for row in rows:
        row["wilcoxon_ref"] = reference
        method, site, target = str(row["method"]), str(row["site"]), str(row["target"])
        if method == reference or method not in cases or reference not in cases:
            row["wilcoxon_p"] = row["wilcoxon_pairs"] = ""
            continue
        if site.startswith("client"):
            cid = int(site[len("client"):])
            keys = [k for k in cases[reference] if k[0] == cid and k[2] == target]
        else:
            keys = [k for k in cases[reference] if k[2] == target]
        p, n = paired_wilcoxon(cases[reference], cases[method], keys)
        row["wilcoxon_p"] = "" if math.isnan(p) else p
        row["wilcoxon_pairs"] = n


def add_seed_deltas(rows: Sequence[Dict[str, object]],
                    per_seed: Mapping[str, Mapping[int, Sequence[Mapping[str, object]]]],
                    reference: str) -> None:
    """Fill ``seed_delta_mean``, ``seed_delta_std`` and ``seed_delta_above`` of ``rows`` (several
    seeds): the row's Dice minus the reference's, paired by seed (a seed is one train/validation
    split and initialisation for every method), its mean and sample std over the seeds both
    finished, and in how many of them the row is above (``'2/3'``). The reference's own rows,
    and rows without a common seed, stay empty."""
    dice = {label: {(str(r["site"]), str(r["target"]), seed): float(r["dice_mean"])
                    for seed, seed_rows in runs.items() for r in seed_rows}
            for label, runs in per_seed.items()}
    ref = dice.get(reference, {})
    for row in rows:
        row["seed_delta_mean"] = row["seed_delta_std"] = row["seed_delta_above"] = ""
        method = str(row["method"])
        if method == reference:
            continue
        keys = [(str(row["site"]), str(row["target"]), seed) for seed in per_seed.get(method, {})]
        diffs = [dice[method][k] - ref[k] for k in keys if k in ref and k in dice[method]
                 and not math.isnan(dice[method][k]) and not math.isnan(ref[k])]
        if not diffs:
            continue
        mean, std = _mean_std(diffs)
        row["seed_delta_mean"] = mean
        row["seed_delta_std"] = "" if math.isnan(std) else std
        row["seed_delta_above"] = f"{sum(d > 0 for d in diffs)}/{len(diffs)}"


def _mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample (ddof=1) std of the defined ``values``; std NaN below two values."""
    defined = [float(v) for v in values if not math.isnan(float(v))]
    if not defined:
        return math.nan, math.nan
    mean = sum(defined) / len(defined)
    if len(defined) < 2:
        return mean, math.nan
    return mean, math.sqrt(sum((v - mean) ** 2 for v in defined) / (len(defined) - 1))


def _common(values: Sequence[object]) -> object:
    """The value all ``values`` share, else ``''``."""
    return values[0] if values and len({str(v) for v in values}) == 1 else ""


def aggregate_seeds(per_seed: Mapping[int, Sequence[Mapping[str, object]]]
                    ) -> List[Dict[str, object]]:
    """One method's ``comparison.csv`` rows over several seeds: for each (site, target) of
    its per-seed rows (``per_seed[seed]``, as :func:`result_rows` gives them), the mean and
    the std over the seeds of the per-seed Dice and HD95 means; ``train_seconds``: the mean
    per seed; ``seeds``: the seeds averaged."""
    order: List[Tuple[str, str]] = []
    groups: Dict[Tuple[str, str], List[Tuple[int, Mapping[str, object]]]] = {}
    for seed, rows in per_seed.items():
        for r in rows:
            key = (str(r["site"]), str(r["target"]))
            if key not in groups:
                order.append(key)
            groups.setdefault(key, []).append((seed, r))
    out = []
    for key in order:
        members = [r for _, r in groups[key]]
        first = members[0]
        row: Dict[str, object] = {"method": first["method"], "site": key[0], "target": key[1],
                                  "model": _common([m["model"] for m in members])}
        for metric in ("dice", "hd95"):
            row[f"{metric}_mean"], row[f"{metric}_std"] = _mean_std(
                [float(m[f"{metric}_mean"]) for m in members])
        row["cases"] = _common([m["cases"] for m in members])
        row["train_seconds"] = sum(float(m["train_seconds"]) for m in members) / len(members)
        row["lost_replies"] = sum(int(m.get("lost_replies", 0)) for m in members)
        row["seeds"] = " ".join(str(s) for s, _ in groups[key])
        out.append(row)
    return out


def validation_curve(out: Path, method: Method, seed: Optional[int] = None) -> Dict[int, float]:
    """Mean over sites of the validation Dice per round of the model the method deploys.

    A global method's sites validate the global model they receive: the aggregate of round
    ``r`` is scored in round ``r + 1`` (``val_dice_global``); the last aggregate is scored by
    the final evaluation, which metrics.csv does not hold, so its curve ends one round early.
    The same holds for a site that validates its model blended with the aggregate
    (``ala_validate_blend``, FedICRA-ref: ``val_dice_blend``). Centralised runs log one row per site per validation; the pooled row (client -1) is
    skipped. FT's fine-tuning appears as round ``rounds + 1``.
    """
    folder = result_dir(out, method, seed) or run_dir(out, method, seed)
    rows = read_csv(folder / "metrics.csv")
    entry = get_method(method.strategy)
    is_global = entry.deploys == "global" and entry.federated
    by_round: Dict[int, List[float]] = {}
    for r in rows:
        if r.get("client") in ("-1", "", None):
            continue
        if is_global:
            key, lag = "val_dice_global", 1
        elif r.get("val_dice_blend") not in ("", None):
            key, lag = "val_dice_blend", 1  # ala_validate_blend: the blend with round r - 1's aggregate
        else:
            key, lag = "val_dice", 0
        if r.get(key) in ("", None):
            continue
        by_round.setdefault(int(r["round"]) - lag, []).append(float(r[key]))
    return {k: sum(v) / len(v) for k, v in sorted(by_round.items()) if k >= 1}


# ---------------------------------------------------------------------- writing
COLUMNS = ("method", "site", "target", "model", "dice_mean", "dice_std", "hd95_mean",
           "hd95_std", "cases", "train_seconds", "lost_replies", "seeds", "wilcoxon_ref",
           "wilcoxon_p", "wilcoxon_pairs", "seed_delta_mean", "seed_delta_std",
           "seed_delta_above")
#: ``comparison_per_seed.csv``: the single-seed columns and the run's seed.
PER_SEED_COLUMNS = ("seed",) + COLUMNS[:COLUMNS.index("seeds")]


def write_csv(path: Path, rows: Sequence[Mapping[str, object]],
              columns: Sequence[str] = COLUMNS) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def _cell(mean: float, std: float, digits: int) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if not math.isnan(std) else f"{mean:.{digits}f}"


def _num(row: Mapping[str, object], key: str) -> float:
    value = row.get(key, "")
    return math.nan if value in ("", None) else float(value)  # type: ignore[arg-type]


def _p_cell(row: Mapping[str, object]) -> str:
    p = _num(row, "wilcoxon_p")
    if math.isnan(p):
        return ""
    return f"{p:.3g} (n={row.get('wilcoxon_pairs', '')})"


def _delta_cell(row: Mapping[str, object]) -> str:
    mean, std = _num(row, "seed_delta_mean"), _num(row, "seed_delta_std")
    if math.isnan(mean):
        return ""
    spread = "" if math.isnan(std) else f" ± {std:.3f}"
    return f"{mean:+.3f}{spread} ({row.get('seed_delta_above', '')} above)"


def markdown(rows: Sequence[Mapping[str, object]], seeds: Optional[Sequence[int]] = None) -> str:
    """One table per target: methods as rows; each site's Dice, the mean over sites, the mean
    over sites of HD95, the pooled Dice, the training wall time and the p-value of the paired
    test against the reference (pooled over the sites). One seed (``seeds`` None): ± std over
    cases (mean of sites: over sites). Several: every cell is mean ± std over the seeds."""
    parts = []
    multi = seeds is not None
    reference = next((str(r["wilcoxon_ref"]) for r in rows if r.get("wilcoxon_ref")), "")
    targets = list(dict.fromkeys(str(r["target"]) for r in rows))
    for target in targets:
        mine = [r for r in rows if r["target"] == target]
        sites = sorted({str(r["site"]) for r in mine if str(r["site"]).startswith("client")},
                       key=lambda s: int(s[len("client"):]))
        head = (["method", "tested"] + [s.replace("client", "site ") for s in sites]
                + ["mean of sites", "HD95 (mean of sites)", "pooled",
                   "train time" + (" (per seed)" if multi else "")]
                + (["seeds"] if multi else []) + ([f"p vs {reference}"] if reference else [])
                + ([f"Δ vs {reference}, by seed"] if multi and reference else []))
        if multi:
            title = (f"**{target}**: test Dice, mean ± std over the seeds "
                     f"({', '.join(map(str, seeds))}) of each seed's value (a site: the mean "
                     "over its test cases)")
        else:
            title = (f"**{target}**: test Dice (mean ± std over cases; mean of sites: ± std over "
                     "sites)")
        lines = [title, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for method in dict.fromkeys(str(r["method"]) for r in mine):
            by_site = {str(r["site"]): r for r in mine if r["method"] == method}
            mean = by_site.get("mean of sites", {})
            pooled = by_site.get("pooled", {})
            first = next(iter(by_site.values()))
            lost = _num(first, "lost_replies")
            cells = [method + (f" ⚠{lost:.0f}" if lost > 0 else ""), str(first["model"])]
            cells += [_cell(_num(by_site[s], "dice_mean"), _num(by_site[s], "dice_std"), 3)
                      if s in by_site else "n/a" for s in sites]
            cells += [f"**{_cell(_num(mean, 'dice_mean'), _num(mean, 'dice_std'), 3)}**",
                      _cell(_num(mean, "hd95_mean"), _num(mean, "hd95_std"), 1),
                      _cell(_num(pooled, "dice_mean"),
                            _num(pooled, "dice_std") if multi else math.nan, 3),
                      f"{float(first['train_seconds']) / 60:.1f} min"]
            if multi:
                cells.append(str(len(str(first.get("seeds", "")).split())))
            if reference:
                cells.append(_p_cell(pooled or mean))
            if multi and reference:
                cells.append(_delta_cell(mean))
            lines.append("| " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    if any(_num(r, "lost_replies") > 0 for r in rows):
        parts.append("⚠N: the run (over the seeds: the runs) trained without N site replies "
                     "(metrics.csv rows with missing = 1: a site missed a round's deadline or "
                     "failed, and the round was aggregated without it), so its values depend on "
                     "the machine's load; rerun it with a longer round_timeout.")
    if reference:
        note = (f"p vs {reference}: two-sided Wilcoxon signed-rank test (scipy.stats.wilcoxon) "
                f"of the row's per-case test Dice against {reference}'s, paired case by case over "
                "every test case of the target (all sites); n: the number of pairs; p = 1 where "
                "every difference is zero. comparison.csv also holds it per site.")
        if multi:
            note += (" Seeds are combined by averaging each test case's Dice over the seeds "
                     "first: the test set is the same for every seed (a seed changes only the "
                     "initialisation and the validation split). The p-value says how "
                     "consistently one model beats another case by case, not whether another "
                     f"seed would. That is Δ vs {reference}, by seed: the row's mean of sites "
                     f"minus {reference}'s, paired by seed, mean ± std over the seeds both "
                     "finished, and in how many of them the row is above.")
        if reference != "FedICRA":
            note += (f" FedICRA is not among the compared methods: the reference is {reference}, "
                     "the first method.")
        parts.append(note)
    return "\n\n".join(parts) + "\n"


def plot(curves: Mapping[str, Sequence[Mapping[int, float]]], path: Path, title: str) -> None:
    """One line per method: its validation curve, or with several seeds (curves) the mean over
    seeds per round and a shaded band from the lowest to the highest seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    styles = ["-", "--", "-.", ":"]
    banded = False
    for i, (label, runs) in enumerate(curves.items()):
        runs = [c for c in runs if c]
        if not runs:
            continue
        rounds = sorted({k for c in runs for k in c})
        values = [[c[k] for c in runs if k in c] for k in rounds]
        means = [sum(v) / len(v) for v in values]
        line, = ax.plot(rounds, means, styles[i // 10 % 4], marker="o", markersize=3,
                        label=label if len(runs) == 1 else f"{label} ({len(runs)} seeds)")
        if len(runs) > 1:
            banded = True
            ax.fill_between(rounds, [min(v) for v in values], [max(v) for v in values],
                            color=line.get_color(), alpha=0.15, linewidth=0)
    ax.set_xlabel("round")
    ax.set_ylabel("validation Dice (mean of sites)")
    ax.set_title(title + ("\nline: mean over seeds; band: min..max over seeds" if banded else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def reference_method(labels: Sequence[str]) -> str:
    """FedICRA when it is among ``labels``, else the first one ("" for none)."""
    return "FedICRA" if "FedICRA" in labels else (labels[0] if labels else "")


def write_reports(out: Path, methods: Sequence[Method], title: str,
                  seeds: Optional[Sequence[int]] = None) -> List[Path]:
    """``comparison.csv``, ``comparison.md`` and ``val_dice.png`` of the finished ``methods``
    (one seed: ``seeds`` None; several: mean ± std over those of ``seeds`` each has finished,
    and ``comparison_per_seed.csv``)."""
    plan: List[Optional[int]] = list(seeds) if seeds is not None else [None]
    folders = {m.label: [(s, result_dir(out, m, s)) for s in plan] for m in methods}
    folders = {label: [(s, f) for s, f in runs if f is not None] for label, runs in folders.items()}
    done = [m for m in methods if folders[m.label]]
    if seeds is None:
        rows = [row for m in done for row in result_rows(out, m)]
    else:
        per_seed = {m.label: {s: result_rows(out, m, s) for s, _ in folders[m.label]} for m in done}
        write_csv(out / "comparison_per_seed.csv",
                  [dict(r, seed=s) for m in done for s, runs in per_seed[m.label].items()
                   for r in runs], PER_SEED_COLUMNS)
        rows = [row for m in done for row in aggregate_seeds(per_seed[m.label])]
    reference = reference_method([m.label for m in done])
    cases = {m.label: case_dice([f for _, f in folders[m.label]]) for m in done}
    add_wilcoxon(rows, cases, reference)
    if seeds is not None:
        add_seed_deltas(rows, per_seed, reference)
    write_csv(out / "comparison.csv", rows)
    text = markdown(rows, seeds) if rows else "no method finished yet\n"
    tmp = out / "comparison.md.tmp"
    tmp.write_text(text)
    tmp.replace(out / "comparison.md")
    plot({m.label: [validation_curve(out, m, s) for s, _ in folders[m.label]] for m in done},
         out / "val_dice.png", title)
    written = [out / "comparison.csv", out / "comparison.md", out / "val_dice.png"]
    return written + ([out / "comparison_per_seed.csv"] if seeds is not None else [])


#: Rows that are not competitors of FedICRA: the ablation and the centralised references.
NOT_BASELINES = ("FedICRA", "FedICRA-ref", "FedAvg + full objective", "CT-weak", "CT-full")


def best_baseline(out: Path, target: str = "") -> str:
    """The ``--methods`` name of the compared method with the highest mean-of-sites test Dice
    in ``out/comparison.csv`` (averaged over targets unless ``target`` is given), leaving out
    FedICRA, the ablation row and the centralised references."""
    rows = [r for r in read_csv(out / "comparison.csv") if r["site"] == "mean of sites"
            and r["method"] not in NOT_BASELINES and (not target or r["target"] == target)]
    if not rows:
        raise SystemExit(f"{out / 'comparison.csv'} holds no baseline yet")
    scores: Dict[str, List[float]] = {}
    for r in rows:
        scores.setdefault(r["method"], []).append(float(r["dice_mean"]))
    label = max(scores, key=lambda m: sum(scores[m]) / len(scores[m]))
    return next(m.slug for m in all_methods() if m.label == label)
