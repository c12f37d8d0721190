#!/usr/bin/env bash
# Real FAZ, CPU-sized (configs/faz_cpu.toml): FedICRA over three seeds plus the ablation of the
# site-contrastive term (computed without gradient, as in the reference) at the first seed.
# Each run trains in deployment mode and is then tested; summaries go to docs/results.md by hand.
#   bash benchmarks/real_faz_seeds.sh [SEEDS...]      (default: 2022 2023 2024)
# Needs the imported data: python -m dataloaders.import_png ../shared/data/FAZ data/faz_h5 --task faz --workers 2
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
seeds=("${@:-2022 2023 2024}")
[ $# -eq 0 ] && seeds=(2022 2023 2024)
run() {  # exp, extra flags...
    local exp=$1; shift
    local start=$SECONDS
    "$PY" flower_runner.py --config configs/faz_cpu.toml --exp "$exp" --overwrite "$@"
    echo "$exp: trained in $((SECONDS - start)) s"
    "$PY" test_client.py --client all --exp "$exp" --no_images
}
for seed in "${seeds[@]}"; do
    run "faz_cpu/FedICRA_seed$seed" --seed "$seed"
done
run "faz_cpu/FedICRA_scnograd_seed${seeds[0]}" --seed "${seeds[0]}" --set sc_grad=false
