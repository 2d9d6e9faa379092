#!/usr/bin/env bash
# The GPU check on a CUDA machine with no megatron-core and no network (the lent H200: Python
# 3.12, torch + CUDA, transformers). Installs megatron-core from a carried wheel and this
# package with --no-deps into a private site folder, then runs tests/gpu/gpu_check.py.
#
# Prepare once, here (the wheel is 2.6 MB; .whl/ is git-ignored through .git/info/exclude):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl megatron-core==0.16.1
# Then, on the device (carry: [".whl"]):
#   bash tests/gpu/run_gpu_check.sh "$OUT"            # ~7.5 min; gpu_check.json + gpu_check.log
#   bash tests/gpu/run_gpu_check.sh OUT --dry-run     # anywhere: arguments and result schema
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:?usage: run_gpu_check.sh OUT_DIR [--dry-run] [--stages a,b]}
shift
site=${GPU_CHECK_SITE:-/tmp/longact_site}
if [[ " $* " != *" --dry-run "* ]]; then
  wheel=$(ls .whl/megatron_core-*.whl 2>/dev/null | head -n 1 || true)
  if ! python3 -c "import megatron.core" 2>/dev/null; then
    [ -n "$wheel" ] || { echo "no megatron-core: carry .whl/ with its wheel (see this file's header)" >&2; exit 2; }
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" "$wheel"
  fi
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile \
    --target "$site" .
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
python3 tests/gpu/gpu_check.py --out "$out" "$@"
