#!/usr/bin/env bash
# The checks that need a GPU, in one run (docs/benchmarks/cuda.md holds the figures):
#   1. the parity, determinism and resume tests with the simulation and the reconstruction on CUDA
#      (`pytest --device cuda`; ONNX Runtime runs the exported files on whichever provider loads);
#   2. README's main command with --device cuda at the fast preset, twice with the same seed: the time,
#      whether the two files are identical, and the top-1 of the first on the shipped test set.
#
#     tools/bench_cuda.sh OUT_DIR [pytest options, e.g. -n 8]
set -u
out=${1:?usage: tools/bench_cuda.sh OUT_DIR [pytest options]}
shift
mkdir -p "$out"
export TQDM_DISABLE=1 PYTHONUNBUFFERED=1

python - <<'EOF' 2>&1 | tee "$out/environment.txt"
import onnxruntime, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0))
print("onnxruntime", onnxruntime.__version__, "providers", onnxruntime.get_available_providers())
EOF

start=$SECONDS
python -m pytest -q -p no:cacheprovider --device cuda "$@" tests/test_quantize.py tests/test_reconstruct.py \
    tests/test_modcap.py 2>&1 | tee "$out/pytest.txt"
echo "pytest: $((SECONDS - start)) s" | tee -a "$out/pytest.txt"

for run in a b; do
    start=$SECONDS
    python -m onnxmodcap.cli quantize models/resnet18.onnx --calib models/calib --bits 4 --device cuda \
        --preset fast --seed 0 -o "$out/resnet18.w4a4.$run.onnx" --report "$out/report.$run.json" \
        2>&1 | tee "$out/quantize.$run.txt"
    echo "quantize $run: $((SECONDS - start)) s" | tee -a "$out/quantize.$run.txt"
done
sha256sum "$out"/resnet18.w4a4.*.onnx | tee "$out/sha256.txt"
python -m onnxmodcap.cli evaluate "$out/resnet18.w4a4.a.onnx" --data models/fashion_mnist_test.npz \
    --reference models/resnet18.onnx --json >"$out/evaluate.json"
cat "$out/evaluate.json"
