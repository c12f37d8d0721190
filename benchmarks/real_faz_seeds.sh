#!/usr/bin/env bash
# Real FAZ, CPU-sized (configs/faz_cpu.toml): FedICRA over three seeds, with the site-contrastive
# term trained (sc_grad=true) and computed without gradient as in the reference code
# (sc_grad=false); each run is trained in deployment mode, then tested, then all are summarised.
#   bash benchmarks/real_faz_seeds.sh                 (about 20 min a run on 2 CPU cores)
# Needs the imported data: python -m dataloaders.import_png ../shared/data/FAZ data/faz_h5 --task faz --workers 2
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SEEDS=(2022 2023 2024)
run() {  # exp, extra flags...
    local exp=$1; shift
    local start=$SECONDS
    "$PY" flower_runner.py --config configs/faz_cpu.toml --exp "$exp" --overwrite "$@"
    echo "$exp: trained in $((SECONDS - start)) s"
    "$PY" test_client.py --client all --exp "$exp" --no_images
}
for seed in "${SEEDS[@]}"; do
    run "faz_cpu/FedICRA_seed$seed" --seed "$seed" --set sc_grad=true
    run "faz_cpu/FedICRA_scnograd_seed$seed" --seed "$seed" --set sc_grad=false
done
for variant in FedICRA FedICRA_scnograd; do
    echo "== $variant"
    "$PY" -m benchmarks.summarise_seeds "${SEEDS[@]/#/model/faz_cpu/${variant}_seed}"
done
