#!/usr/bin/env bash
# One-shot GPU check of the Triton block-sparse flash-attention kernels (issue 5). Needs a CUDA machine;
# run it from anywhere:  bash tests/run_gpu_kernels.sh      (QUICK=0: full benchmark; FULL=1: all tests too)
#
# Steps (each prints its own results; a failing step does not stop the later ones):
#   1. `python -m zoo.bench.attention --gpu --quick`: zoo-triton vs SDPA vs FlexAttention for dense, causal,
#      window, Segments and Radial at 16 frames x 1024 tokens, D = 64, bf16, with the max error against
#      SDPA; the 25% block-sparse point vs dense; peak memory; PASS/FAIL against the issue's targets.
#      QUICK=0: 16 and 32 frames, D = 64 and 128, kept fractions 100/50/25/10%.
#   2. the `gpu`-marked tests (bf16 correctness, D = 64/128/256 at 1000 x 1537, O(N) memory), one autotune
#      config per pass (ZOO_TRITON_SINGLE_CONFIG=1) to bound compile time; the speed sanity test only with
#      FULL=1 (it wants the autotuned kernels, and step 1 already times them).
#   3. FULL=1: every test of tests/test_kernels_flash.py and tests/test_radial.py on compiled kernels.
#   4. GRAPH=1 (default): the graph kernels' tests compiled (GATv2 edge softmax, vector attention's aggregation:
#      tests/test_graph_kernel.py, tests/test_vector_kernel.py; attend() over Edges, tests/test_edges_mask.py and the
#      flash kernel's EDGE slot, tests/test_kernel_edges.py; small graphs), with one autotune config per kernel
#      (ZOO_TRITON_SINGLE_CONFIG=1, as in step 2), then `zoo bench graph --device cuda` at 100k and 1M edges
#      (GATv2 vs PyG, time and memory; autotuned).
# Compile time dominates (Triton autotuning, torch.compile of FlexAttention per mask): untimed so far, meant
# to fit one 15-minute GPU session with the defaults. Paste the printed tables, with the GPU model, into
# docs/bench_attention.md and docs/benchmarks.md.
#
# Interpreter: $PY, else .venv/bin/python when this checkout has one, else python3 (a bare GPU image that already
# holds torch, triton, pytest and, for step 4, torch_geometric). When `zoo` does not import there, nothing is
# installed: a shadow tree of symbolic links lays this checkout out as the installed package would be (zoo/ with
# tasks/, kernels/, configs/ and checkpoints/ inside, as setup.py maps them) and goes first on PYTHONPATH, with
# PYTHONSAFEPATH=1 so that `python -m` does not put this directory (whose zoo/ lacks those) in front of it.
set -uo pipefail
cd "$(dirname "$0")/.."
QUICK=${QUICK:-1}
FULL=${FULL:-0}
GRAPH=${GRAPH:-1}
status=0
if [ -z "${PY:-}" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if [ -n "${ZOO_SHADOW:-}" ] || ! "$PY" -c "import zoo.kernels, zoo.bench.attention" 2>/dev/null; then
    shadow="${TMPDIR:-/tmp}/zoo_shadow_$$"
    mkdir -p "$shadow/zoo"
    trap 'rm -rf "$shadow"' EXIT
    for entry in "$PWD"/zoo/*; do ln -s "$entry" "$shadow/zoo/"; done
    ln -s "$PWD/tasks" "$shadow/zoo/tasks"
    ln -s "$PWD/kernels" "$shadow/zoo/kernels"
    ln -s "$PWD/configs" "$shadow/zoo/configs"
    ln -s "$PWD/checkpoints" "$shadow/zoo/checkpoints"
    export PYTHONPATH="$shadow${PYTHONPATH:+:$PYTHONPATH}" PYTHONSAFEPATH=1
    "$PY" -c "import zoo, zoo.kernels, zoo.bench.attention; print('zoo from', zoo.__file__)" \
        || { echo "cannot import zoo with $PY"; exit 2; }
fi

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || { echo "no nvidia-smi / GPU"; exit 2; }
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" || exit 2

echo "== 1. benchmark with targets"
if [ "$QUICK" = "1" ]; then
    "$PY" -m zoo.bench.attention --gpu --quick || status=1
else
    "$PY" -m zoo.bench.attention --gpu || status=1
fi

echo "== 2. gpu-marked kernel tests"
ZOO_TRITON_SINGLE_CONFIG=1 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels_flash.py -s -k "not speed" \
    || status=1

if [ "$FULL" = "1" ]; then
    echo "== 3. speed sanity test and every kernel test on compiled kernels"
    "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels_flash.py -s -k speed || status=1
    ZOO_TRITON_SINGLE_CONFIG=1 "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels_flash.py tests/test_radial.py \
        -k "not compiles_for_sm90" || status=1
fi
if [ "$GRAPH" = "1" ]; then
    echo "== 4. graph kernels (GATv2 edge softmax, vector attention, attend() over Edges) compiled; GATv2 vs PyG on the GPU (issue 6: >= 3x)"
    ZOO_TRITON_SINGLE_CONFIG=1 "$PY" -m pytest -q -p no:cacheprovider tests/test_graph_kernel.py \
        tests/test_vector_kernel.py tests/test_edges_mask.py tests/test_kernel_edges.py \
        tests/test_graph_kernel_fullgraph.py || status=1
    "$PY" -m zoo.bench.graph --device cuda --sizes 100000:10000,1000000:100000 --channels 8,64 --repeats 5 || status=1
fi
echo "== done (status $status)"
exit $status
