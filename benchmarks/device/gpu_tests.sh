#!/bin/bash
# On the lent GPU machine (after benchmarks/device/prepare.sh here; carry .gpu): every `gpu` test, among them the
# deployment over Flower's runtime with one GPU node and one CPU node (issue 17), in a venv over the image's packages
# with flwr's stack and fedspec installed as on a user's machine.
set -o pipefail
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=$PWD/.gpu/site
python3 -m venv /tmp/venv || exit 1
# The image's python3 is itself a venv (/opt/torch/.venv): --system-site-packages would reach the base interpreter's
# packages, not torch's. A .pth file puts the image's site-packages behind the venv's own (flwr's pins win).
python3 -c "import site; print('\n'.join(site.getsitepackages()))" > "$(/tmp/venv/bin/python -c 'import site; print(site.getsitepackages()[0])')/image.pth"
/tmp/venv/bin/python -m pip install -q --no-index --no-deps --no-compile .gpu/wheels312/*.whl || exit 1
# fedspec itself, editable as the deployment guide installs it where `flwr run` starts from the checkout
/tmp/venv/bin/python -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
/tmp/venv/bin/python -c "import torch, flwr, opacus; print('torch', torch.__version__, 'flwr', flwr.__version__, 'opacus', opacus.__version__)"
/tmp/venv/bin/python -m pytest -q -rs -s -m gpu -p no:cacheprovider "$@" 2>&1 | tee ${OUT:-/tmp}/gpu_tests.txt
