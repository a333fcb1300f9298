#!/usr/bin/env bash
# Creates .venv and installs nnunet-node with its test tools. Idempotent: a second run is quick.
#
# Without an NVIDIA GPU it installs the CPU build of torch (2.2 GB instead of 6.6 GB) and pins
# torchvision to the matching release, since an unpinned torchvision (pulled in through timm) would
# replace torch with a CUDA build. With a GPU (nvidia-smi works), or with NNUNET_NODE_TORCH=cuda,
# pip's default CUDA build is installed instead.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
stamp=.venv/.nnunet-node-installed
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then
    exit 0
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)

constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
torch_mode=${NNUNET_NODE_TORCH:-auto}
if [ "$torch_mode" = auto ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        torch_mode=cuda
    else
        torch_mode=cpu
    fi
fi
if [ "$torch_mode" = cpu ]; then
    echo "setup: installing the CPU build of torch"
    # NNUNET_NODE_TORCH_INDEX=https://download.pytorch.org/whl/cpu fetches the small CPU wheel
    # where PyPI would serve the CUDA one; this project's build machines have it on disk.
    "${pip[@]}" install "torch==2.13.0" ${NNUNET_NODE_TORCH_INDEX:+--index-url "$NNUNET_NODE_TORCH_INDEX"}
    printf 'torch==2.13.0\ntorchvision==0.28.0\n' >"$constraints"
else
    echo "setup: installing torch with CUDA"
    : >"$constraints"
fi
"${pip[@]}" install -c "$constraints" -e ".[test]"
touch "$stamp"
echo "setup: .venv is ready"
