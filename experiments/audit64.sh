#!/usr/bin/env bash
# The 64-prompt audit table (docs/results/audit64.md): for one concept, erase with each method named and audit
# the delta at 64 prompts a set with the testbed's attack settings. The first audit of a concept carries the
# oracle's parts; every later one copies them in with --reuse from a finished audit of the concept, so the oracle
# is attacked once. Resumable: run it again after a kill and each audit continues (--resume); a finished one is
# kept. An earlier session's audits, committed as experiments/checkpoints/audits64-*.tar.gz, are unpacked first.
#   bash experiments/audit64.sh circle advunlearn uce trce esd rece trce-stage1 erasepro co-erasing score
#   python experiments/audit_table.py runs/audits64/*_circle runs/audits64/*_red --markdown TABLE.md
# One torch thread a run (OMP_NUM_THREADS=1; run circle and red side by side on two cores). On this 2-core CPU the
# first audit (with the oracle) took 2.0 h; a later one should take about 65 min (the first one's three attacks on
# the delta took 60-64 min); an erasure took 10 s (UCE) and 4 min (AdvUnlearn).
set -euo pipefail
cd "$(dirname "$0")/.."
concept="${1:?usage: audit64.sh CONCEPT METHOD...}"; shift
erasekit="${ERASEKIT:-.venv/bin/erasekit}"
out="${AUDITS:-runs/audits64}"
mkdir -p "$out/deltas"
for archive in experiments/checkpoints/audits64-*.tar.gz; do
  if [ -f "$archive" ]; then tar -xzf "$archive" -C "$out" --skip-old-files; fi
done
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
finished() {  # a finished audit of this concept, to reuse the oracle's parts from
  for d in "$out"/*_"$concept"; do
    if [ -f "$d/results.json" ]; then echo "$d"; return; fi
  done
}
for method in "$@"; do
  delta="$out/deltas/${method}_$concept.safetensors"
  extra=()
  # a colour reaches most prompts' encodings: AdvUnlearn's retain term at 5 holds preservation (advunlearn.md)
  if [ "$method" = advunlearn ] && [ "$concept" = red ]; then extra=(--set retain_weight=5); fi
  [ -f "$delta" ] || "$erasekit" erase testbed --method "$method" --concept "$concept" --testbed-spec \
    "${extra[@]}" --out "$delta"
  reuse=()
  earlier="$(finished)"
  [ -n "$earlier" ] && [ "$earlier" != "$out/${method}_$concept" ] && reuse=(--reuse "$earlier")
  "$erasekit" audit --delta "$delta" --suite "testbed:$concept" --samples 64 --out "$out/${method}_$concept" \
    --resume "${reuse[@]}"
done
