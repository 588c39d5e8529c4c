#!/usr/bin/env bash
# The accelerator check in one command (see scripts/gpu_check.py): writes ONE JSON file,
# ${1:-gpu_check.json}, in under 8 minutes (no new section after 7; the whole killed at 8).
#   scripts/gpu_check.sh [OUT.json] [gpu_check.py options...]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:-gpu_check.json}"
shift $(( $# > 0 ? 1 : 0 ))
export PYTHONPATH="$here/../src${PYTHONPATH:+:$PYTHONPATH}"
exec timeout --signal=TERM --kill-after=10 470 \
    "${PYTHON:-python}" "$here/gpu_check.py" --out "$out" --budget-s 420 "$@"
