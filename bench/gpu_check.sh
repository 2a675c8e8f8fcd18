#!/usr/bin/env bash
# The GPU check, for any machine with one NVIDIA GPU: (1) the embedded default end to end on that GPU, with CUDA
# activation workers and bf16, through `accelerate launch` and DeepSpeed; (2) the step bench. Record what it
# prints in bench/RESULTS.md with the device named (nvidia-smi's line is printed first).
#
#   bash bench/gpu_check.sh            # on the GPU machine, from the repository root
#   GPU_CHECK_CPU=1 bash bench/gpu_check.sh   # a CPU dry run of the same commands (checks the script itself)
#
# The machine needs this package and its dependencies (pip install -e '.[test]'); a missing one is named up
# front rather than found half-way.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=${OUT:-$(mktemp -d)}
export HF_HUB_OFFLINE=1 WANDB_MODE=offline

missing=$("$PYTHON" - <<'EOF'
import importlib.util
print(" ".join(m for m in ("torch", "deepspeed", "accelerate", "hydra", "omegaconf", "wandb", "transformers",
                           "safetensors", "crosscoder") if importlib.util.find_spec(m) is None))
EOF
)
if [ -n "$missing" ]; then
    echo "gpu_check: missing Python packages: $missing (pip install -e '.[test]')" >&2
    exit 2
fi

if [ "${GPU_CHECK_CPU:-0}" = 1 ]; then
    launch=(--config_file launch/cpu_2proc_zero2.yaml --num_processes 1)
    device=(data.workers.device=cpu trainer.precision=fp32)
    sizes=(sources.toy.train_steps=12 "sources.toy.snapshot_steps=[0,4,12]" sources.toy.hidden_size=32
           "sources.toy.cache_dir=$OUT/toy" trainer.total_tokens=4096 trainer.batch_size=256 data.seq_len=16
           data.model_batch_size=8 data.toy_documents=200 crosscoder.dict_size=64 trainer.log_every=4)
    bench=(--quick)
else
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'torch sees no GPU'; \
print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
    launch=(--config_file launch/1gpu.yaml)
    device=(data.workers.device=cuda trainer.precision=bf16)
    sizes=("sources.toy.cache_dir=$OUT/toy")
    bench=()
fi

echo "== 1. the embedded default on one device: ${device[*]}"
started=$(date +%s)
"$PYTHON" -m accelerate.commands.launch "${launch[@]}" -m crosscoder.train "${device[@]}" "${sizes[@]}" \
    tracking=offline "hydra.run.dir=$OUT/run" 2>&1 | grep -v '^wandb' | tail -n 25
echo "== 1. done in $(( $(date +%s) - started )) s; summary:"
"$PYTHON" - "$OUT/run/summary.json" <<'EOF'
import json, sys
summary = json.load(open(sys.argv[1]))
keys = ("steps", "tokens_seen", "wall_seconds", "loop_seconds", "tokens_per_second", "explained_variance/mean",
        "l0", "dead_fraction", "data_wait_fraction_total")
print({key: summary.get(key) for key in keys})
EOF

echo "== 2. the step bench"
"$PYTHON" bench/step_bench.py "${bench[@]}"
echo "gpu_check: outputs in $OUT"
