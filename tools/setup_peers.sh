#!/usr/bin/env bash
# The peer quantizers' own virtualenvs (never project dependencies), one per peer under DIR:
# DIR/aimet with AIMET-ONNX 2.42 for the `aimet-adaround` cells of tools/bench_real_models.py (run by
# tools/peer_aimet.py), DIR/quark with AMD Quark 0.13 for the `quark-*` cells (tools/peer_quark.py).
#
#     tools/setup_peers.sh [DIR]        # default /tmp/peers
#
# Both require `torch` without a version, so the CPU build of torch on the machine's disk goes in
# first: a bare `torch` requirement would pull a multi-GB CUDA build. torch==2.13.0 is repeated
# beside each peer so that the resolver keeps it. For AIMET it also picks the torchvision that
# matches it (0.28.0, for onnx2torch): left free it upgrades both to the newest torch, with CUDA.
# That torchvision is itself a CUDA build whose ops fail to load on the CPU torch (`import
# torchvision` raises), and only AIMET's AdaScale (onnx2torch) uses it, not AdaRound: it is
# removed again. Quark compiles its custom-op library on its first import (a minute).
set -euo pipefail
dir=${1:-/tmp/peers}

peer_venv() {  # VENV PACKAGE...: a virtualenv with the CPU torch and the packages
    local venv=$1
    shift
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --upgrade pip
    "$venv/bin/pip" install -q torch==2.13.0
    "$venv/bin/pip" install -q "$@" torch==2.13.0 numpy onnxruntime
}

peer_venv "$dir/aimet" aimet-onnx==2.42.0
"$dir/aimet/bin/pip" uninstall -y -q torchvision
peer_venv "$dir/quark" amd-quark==0.13

for peer in aimet quark; do
    (cd "$dir" && "$dir/$peer/bin/python" - "$peer" <<'PY'
from importlib.metadata import version
import importlib
import sys
peer = sys.argv[1]
importlib.import_module({"aimet": "aimet_onnx", "quark": "quark.onnx"}[peer])  # it imports
import torch
assert not torch.version.cuda, "a CUDA build of torch came in"
print(peer, "python", sys.version.split()[0])
for package in ({"aimet": "aimet-onnx", "quark": "amd-quark"}[peer], "torch", "onnxruntime", "onnx", "numpy"):
    print(" ", package, version(package))
PY
    )
done
