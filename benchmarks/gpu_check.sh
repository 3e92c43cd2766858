#!/usr/bin/env bash
# The GPU readiness check in one command (benchmarks/gpu_check.py: smoke runs of every model type,
# IUQ step overhead at the paper's size, L_inter against its roofline), about 8 minutes on one H200.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR] [--device cpu] [more gpu_check.py options]
#
# A machine without pycocotools / faster-coco-eval gets them from wheels in .gpu_wheels/ (built where
# PyPI is reachable, for the machine's Python; see docs/benchmarks.md "GPU check"), installed into a
# scratch folder put on PYTHONPATH. iuq is imported from this checkout. The summary table ends the
# output and is written to OUT_DIR/summary.md (default gpu_check_out/).
set -u -o pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$REPO/gpu_check_out}"
[ $# -gt 0 ] && shift
PY="${PYTHON:-python3}"
if compgen -G "$REPO/.gpu_wheels/*.whl" > /dev/null; then
  SITE="$(mktemp -d)"
  "$PY" -m pip install -q --no-index --no-deps --target "$SITE" "$REPO"/.gpu_wheels/*.whl || echo "WARN: wheel install failed"
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 MPLBACKEND=Agg
mkdir -p "$OUT"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
"$PY" "$REPO/benchmarks/gpu_check.py" --out "$OUT" "$@" 2>&1 | tee "$OUT/log.txt"
