#!/usr/bin/env bash
# Extraction on one NVIDIA GPU, in at most 8 minutes: images/s from 20,000 JPEGs of 500x375 and 2,000 photos of
# 12 megapixels, with decode fast and exact; the bare network as the ceiling; GPU utilisation and peak memory;
# and the GPU's features against the CPU's in fp32. The report goes to bench/results/gpu.md and gpu.json.
#
#   bash bench/gpu.sh                          # on a machine with one NVIDIA GPU
#   bash bench/gpu.sh --quick --device cpu     # a seconds-long run of the whole script, anywhere
#   PYTHON=/path/to/python bash bench/gpu.sh   # a Python that already has torch and torchvision
#
# Set-up: it uses $PYTHON (default: the repo's .venv, else python3) when that has what the pipeline needs, and
# otherwise makes .venv-gpu and installs the repo into it (pip, from the network). Extra arguments go to
# python -m bench.gpu (see its --help).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
    PYTHON=python3
    [[ -x .venv/bin/python ]] && PYTHON=.venv/bin/python
fi
# whether each package is there, without importing them (torch and scikit-learn alone take seconds)
needs="import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in sys.argv[1:]))"
if ! "$PYTHON" -c "$needs" torch torchvision h5py numpy PIL sklearn yaml tqdm 2>/dev/null; then
    echo "setting up .venv-gpu (pip install -e .) ..."
    python3 -m venv .venv-gpu
    .venv-gpu/bin/pip install -q -e .
    PYTHON=.venv-gpu/bin/python
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PYTHON" -m bench.gpu "$@"
