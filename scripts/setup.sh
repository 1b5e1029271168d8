#!/usr/bin/env bash
# Install syncbn and its dependencies on a fresh machine (Python >= 3.10 with pip).
# torch==2.13.0 goes first when torch is missing: a bare `pip install torch` would pull several GB
# of CUDA wheels, while this pinned version resolves to the machine's local CPU build.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[dev]"
