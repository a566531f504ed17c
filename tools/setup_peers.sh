#!/usr/bin/env bash
# The peer quantizers' own virtualenv (never a project dependency): AIMET-ONNX 2.42 for the
# `aimet-adaround` cells of tools/bench_real_models.py, which run tools/peer_aimet.py under it.
#
#     tools/setup_peers.sh [VENV]        # default /tmp/peers/aimet
#
# aimet-onnx 2.42.0 requires `torch` without a version and onnxruntime>=1.19, so the CPU build of
# torch on the machine's disk goes in first: a bare `torch` requirement would pull a multi-GB CUDA
# build. torch==2.13.0 is repeated beside aimet-onnx so that the resolver keeps it and picks the
# torchvision that matches it (0.28.0, for onnx2torch): left free it upgrades both to the newest
# torch, with CUDA. That torchvision is itself a CUDA build whose ops fail to load on the CPU torch
# (`import torchvision` raises), and only AIMET's AdaScale (onnx2torch) uses it, not AdaRound: it
# is removed again.
set -euo pipefail
venv=${1:-/tmp/peers/aimet}
python3 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q torch==2.13.0
"$venv/bin/pip" install -q aimet-onnx==2.42.0 torch==2.13.0 numpy onnxruntime
"$venv/bin/pip" uninstall -y -q torchvision
"$venv/bin/python" - <<'EOF'
from importlib.metadata import version
import sys
import aimet_onnx  # noqa: F401 (it imports)
import torch
assert not torch.version.cuda, "a CUDA build of torch came in"
print("python", sys.version.split()[0])
for package in ("aimet-onnx", "torch", "onnxruntime", "onnx", "numpy"):
    print(package, version(package))
EOF
