#!/usr/bin/env bash
# Creates .venv and installs nnunet-node with its test tools, showing pip's progress. Idempotent:
# a second run is quick.
#
# torch: without an NVIDIA GPU (or with NNUNET_NODE_TORCH=cpu) the CPU build is installed. It
# comes from pip's configured indexes when they already offer a CPU build of torch (some machines
# keep one on disk); otherwise from the PyTorch CPU wheel index (TORCH_CPU_INDEX), since plain
# `pip install torch` on Linux fetches the CUDA build with several GB of NVIDIA libraries. The
# script says which it chose. torchvision is pinned to the matching release, since an unpinned
# one (pulled in through timm) would replace torch with a CUDA build. With a GPU (nvidia-smi
# works), or NNUNET_NODE_TORCH=cuda, pip's default CUDA build is installed instead.
# NNUNET_NODE_TORCH_INDEX=<url> forces the index torch comes from.
#
# At the end it checks for dcmtk and dicom3tools, which the test suite runs as real DICOM peers.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_VERSION=2.13.0
TORCHVISION_VERSION=0.28.0
TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
stamp=.venv/.nnunet-node-installed
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then
    exit 0
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check)

# Whether the torch in a `pip install --report` is a CPU build: a "+cpu" local version, or a wheel
# that requires no NVIDIA libraries.
is_cpu_build() {
    .venv/bin/python - "$1" <<'EOF'
import json, sys

items = [i for i in json.load(open(sys.argv[1]))["install"] if i["metadata"]["name"] == "torch"]
def cpu(meta):
    requires = meta.get("requires_dist") or []
    return "+cpu" in meta["version"] or not any(r.lower().startswith("nvidia-") for r in requires)
sys.exit(0 if items and all(cpu(i["metadata"]) for i in items) else 1)
EOF
}

# Whether torch $TORCH_VERSION is installed in .venv as a CPU build.
installed_cpu_torch() {
    .venv/bin/python - <<EOF
import sys
from importlib import metadata
try:
    dist = metadata.distribution("torch")
except metadata.PackageNotFoundError:
    sys.exit(1)
nvidia = any(r.lower().startswith("nvidia-") for r in dist.requires or [])
same = dist.version.split("+")[0] == "$TORCH_VERSION"
sys.exit(0 if same and ("+cpu" in dist.version or not nvidia) else 1)
EOF
}

constraints=$(mktemp)
report=$(mktemp)
trap 'rm -f "$constraints" "$report"' EXIT
torch_mode=${NNUNET_NODE_TORCH:-auto}
if [ "$torch_mode" = auto ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        torch_mode=cuda
    else
        torch_mode=cpu
    fi
fi
if [ "$torch_mode" = cpu ]; then
    if installed_cpu_torch; then
        echo "setup: the CPU build of torch $TORCH_VERSION is already installed"
    elif [ -n "${NNUNET_NODE_TORCH_INDEX:-}" ]; then
        echo "setup: installing the CPU build of torch from NNUNET_NODE_TORCH_INDEX ($NNUNET_NODE_TORCH_INDEX)"
        "${pip[@]}" install "torch==$TORCH_VERSION" --index-url "$NNUNET_NODE_TORCH_INDEX"
    elif "${pip[@]}" install -q --dry-run --no-deps --ignore-installed --report "$report" \
            "torch==$TORCH_VERSION" 2>/dev/null && is_cpu_build "$report"; then
        echo "setup: no GPU; pip's configured indexes offer a CPU build of torch $TORCH_VERSION: installing it"
        "${pip[@]}" install "torch==$TORCH_VERSION"
    else
        echo "setup: no GPU; installing the CPU build of torch $TORCH_VERSION from $TORCH_CPU_INDEX"
        echo "       (pip's default indexes would fetch the CUDA build, several GB)"
        "${pip[@]}" install "torch==$TORCH_VERSION" --index-url "$TORCH_CPU_INDEX"
    fi
    printf 'torch==%s\ntorchvision==%s\n' "$TORCH_VERSION" "$TORCHVISION_VERSION" >"$constraints"
else
    echo "setup: installing torch with CUDA (pip's default build)"
    : >"$constraints"
fi
echo "setup: installing nnunet-node and its dependencies"
"${pip[@]}" install -c "$constraints" -e ".[test]"
touch "$stamp"
echo "setup: .venv is ready"

# The test suite's real DICOM peers (not pynetdicom's console scripts of the same names, which
# .venv/bin holds): compiled programs somewhere on PATH.
has_program() {
    local dir
    local IFS=:
    for dir in $PATH /usr/bin /usr/local/bin; do
        [ "$dir" = "$PWD/.venv/bin" ] && continue
        if [ -x "$dir/$1" ] && [ "$(head -c 2 "$dir/$1")" != "#!" ]; then
            return 0
        fi
    done
    return 1
}
missing=()
for tool in storescu findscu movescu getscu echoscu storescp dcmdump; do
    has_program "$tool" || { missing+=(dcmtk); break; }
done
has_program dciodvfy || missing+=(dicom3tools)
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: note: ${missing[*]} not installed. The node runs without them, but \`make test\`"
    echo "       uses them as real DICOM peers (their tests are skipped without them):"
    echo "       Debian/Ubuntu: sudo apt-get install ${missing[*]}    macOS: brew install dcmtk"
fi
