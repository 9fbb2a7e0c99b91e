#!/usr/bin/env bash
# Train a testbed oracle: the shipped recipe (both runs, docs/TESTBED.md) from scratch, with VALUE left out
# of every scene and so of every caption. Resumable: run it again after a kill and it continues from the
# last checkpoint; a finished run is skipped. Installs the result at src/erasekit/testbed/weights/oracles/no-VALUE.
#   bash experiments/train_oracle.sh circle        (about 2 h on an idle 2-core CPU)
set -euo pipefail
cd "$(dirname "$0")/.."
value="${1:?usage: train_oracle.sh VALUE (e.g. circle, red)}"
erasekit="${ERASEKIT:-.venv/bin/erasekit}"
runs="${RUNS:-runs/oracles}/no-$value"
dest="src/erasekit/testbed/weights/oracles/no-$value"

if [ ! -f "$runs/run1/weights/unet_training.json" ]; then
  "$erasekit" testbed train --out "$runs/run1" --seed 0 --steps 2000 --min-snr-gamma 5 --min-snr-from 1250 \
    --ema-from 1250 --exclude "$value"
fi
if [ ! -f "$runs/run2/weights/unet_training.json" ]; then
  "$erasekit" testbed train --out "$runs/run2" --seed 1 --steps 3000 --lr 5e-4 --warmup 100 --min-snr-gamma 5 \
    --min-snr-offset 1 --ema-from 1000 --init-from "$runs/run1/weights" --exclude "$value"
fi
mkdir -p "$dest"
cp -r "$runs/run2/weights/unet" "$runs/run2/weights/unet_training.json" "$dest/"
echo "installed $dest"
