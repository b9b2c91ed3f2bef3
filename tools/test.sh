#!/usr/bin/env bash
# Set up ./.venv with the test dependencies (CPU torch, transformers, mergekit oracle) and run the suite.
# Extra arguments go to pytest, e.g. `bash tools/test.sh -k recipe -x`. Skipped tests are listed
# with their reasons at the end (-rs).
set -euo pipefail
cd "$(dirname "$0")/.."
STREAMMERGE_EXTRAS=test . tools/env.sh
python -m pytest -q -rs -p no:cacheprovider "$@"
