#!/usr/bin/env bash
# The whole CPU comparison of docs/results.md, one command:
#   bash benchmarks/compare_protocol.sh
# 1. every method + the "FedAvg + full objective" ablation on the real FAZ data
#    (configs/compare_faz_cpu.toml, seed 2022) -> results/compare_faz_cpu/
# 2. the same on the synthetic fundus federation (configs/compare_odoc_synthetic_cpu.toml)
#    -> results/compare_odoc_synthetic_cpu/
# 3. FedICRA and the best baseline of table 1 (highest mean-of-sites Dice among the compared
#    methods other than FedICRA, the ablation and the centralised references) with seeds 2023
#    and 2024 -> results/compare_faz_cpu_seed<S>/, then mean and std over the three seeds.
# Each step skips the methods whose results exist, so the script resumes after an interruption.
# Needs: python -m dataloaders.import_png ../shared/data/FAZ data/faz_h5 --task faz --workers 2
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
STEPS=${STEPS:-"faz odoc seeds"}
for step in $STEPS; do
    case $step in
    faz)
        "$PY" -m benchmarks.compare_strategies --config configs/compare_faz_cpu.toml \
            --out results/compare_faz_cpu --keep-going ;;
    odoc)
        [ -d data/synthetic_odoc ] || "$PY" -m dataloaders.synthetic --task odoc \
            --out data/synthetic_odoc --size 96 --train-per-site 40 --test-per-site 10 --seed 2022
        "$PY" -m benchmarks.compare_strategies --config configs/compare_odoc_synthetic_cpu.toml \
            --out results/compare_odoc_synthetic_cpu --keep-going ;;
    seeds)
        best=$("$PY" -m benchmarks.compare_strategies --best-baseline results/compare_faz_cpu)
        echo "best baseline of results/compare_faz_cpu: $best"
        runs_fedicra=(results/compare_faz_cpu/runs/FedICRA)
        runs_best=(results/compare_faz_cpu/runs/$best)
        for seed in 2023 2024; do
            out=results/compare_faz_cpu_seed$seed
            "$PY" -m benchmarks.compare_strategies --config configs/compare_faz_cpu.toml \
                --out "$out" --methods "FedICRA,$best" --seed "$seed"
            runs_fedicra+=("$out/runs/FedICRA")
            runs_best+=("$out/runs/$best")
        done
        echo "== FedICRA, seeds 2022 2023 2024"
        "$PY" -m benchmarks.summarise_seeds "${runs_fedicra[@]}"
        echo "== $best, seeds 2022 2023 2024"
        "$PY" -m benchmarks.summarise_seeds "${runs_best[@]}" ;;
    *) echo "unknown step $step (expected faz, odoc, seeds)" >&2; exit 2 ;;
    esac
done
