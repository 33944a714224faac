#!/usr/bin/env bash
# What the CPU suite cannot check: configs/accelerate_fsdp.yaml on 2+ GPUs (FSDP2 over NCCL,
# float32) running train.py's save, --resume and --eval-steps, then eval.py on the
# result. tests/test_train.py runs the same code paths sharded over two gloo CPU processes
# (tests/fsdp_on_cpu.py); this runs them as users will. The embedded SmolLM2-135M and data,
# offline; a few minutes. Then, where vLLM is installed, vLLM serves the compressed-tensors
# export of the final checkpoint, and NVFP4 exports of the embedded model rounded to nearest,
# W4A16 and W4A4 (bench/vllm_check.py: the schemes vLLM picks, no warning about a fused layer's
# NVFP4 global scales, its greedy answers and logprobs against the student's; one "skip:" line
# where vLLM is absent). Without FP4 tensor cores (before Blackwell) vLLM runs the W4A4 export
# in emulation.
#
#     bash bench/gpu_check.sh            # every visible GPU
#     GPUS=2 OUT=/tmp/gpu_check bash bench/gpu_check.sh
#     VLLM_PYTHON=/opt/vllm/bin/python bash bench/gpu_check.sh   # vLLM in an environment of its own
#
# LAUNCH replaces the launcher and EXTRA adds train.py flags (the script itself was tried on
# CPU with LAUNCH="python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_on_cpu.py",
# the FSDP_* variables of tests/test_train.py and a tiny --model).
#
# Prints one "ok:" line per verified property and exits 0, or stops at the first failure
# (a hang is a failure: each launch has a time limit).
set -euo pipefail
cd "$(dirname "$0")/.."

GPUS=${GPUS:-$(nvidia-smi -L 2>/dev/null | wc -l || true)}
if [ "$GPUS" -lt 2 ]; then
    echo "error: needs 2 or more GPUs, found $GPUS (set GPUS=N to choose)" >&2
    exit 2
fi
OUT=${OUT:-$(mktemp -d)/gpu_check}
if [ -e "$OUT" ]; then
    echo "error: $OUT exists; set OUT to a new directory" >&2
    exit 2
fi
mkdir -p "$OUT"
LIMIT=${LIMIT:-900}  # seconds per launch: a collective that only some processes join hangs

# Held-out examples that split unevenly over the processes: 4 * GPUS + 1 gives process 0 two
# forward batches of 4 and the others one (the padding fix keeps FSDP's all-gathers in step).
uv run python - "$OUT/heldout.jsonl" "$GPUS" <<'PY'
import sys
from pathlib import Path
lines = (Path("assets/instructions/heldout.jsonl").read_text().splitlines(keepends=True))
Path(sys.argv[1]).write_text("".join(lines[: 4 * int(sys.argv[2]) + 1]))
PY

LAUNCH=${LAUNCH:-"uv run accelerate launch --config_file configs/accelerate_fsdp.yaml --num_processes $GPUS train.py"}
read -r -a EXTRA_FLAGS <<< "${EXTRA:-}"
launch() {
    # shellcheck disable=SC2086  # LAUNCH is a command line
    timeout "$LIMIT" $LAUNCH --max-steps 4 --save-steps 2 --eval-steps 2 --eval-dataset "$OUT/heldout.jsonl" --lmbda 0.5 \
        --seed 5 --batch-size 2 --max-new-tokens 32 --max-length 256 --quant-type mxfp4 \
        --teacher-dtype bfloat16 "${EXTRA_FLAGS[@]}" "$@"
}

echo "== FSDP on $GPUS GPUs: 4 steps, checkpoints at 2 and 4, held-out KL at 0, 2, 4 =="
launch --output_dir "$OUT/straight" --save-total-limit 1
echo "== the same, stopped after 2 steps, then --resume =="
launch --output_dir "$OUT/split" --stop-after 2
launch --output_dir "$OUT/split" --resume
echo "== eval.py on the final checkpoint, bfloat16 =="
timeout "$LIMIT" uv run python eval.py "$OUT/straight" --tasks '' --no-perplexity --embedded --limit 8 \
    --dtype bfloat16 --output-dir "$OUT/eval"

uv run python - "$OUT" "$GPUS" <<'PY'
import json, math, sys
from pathlib import Path

import torch
from safetensors.torch import load_file

out, gpus = Path(sys.argv[1]), int(sys.argv[2])

def metrics(run):
    return [json.loads(line) for line in (out / run / "metrics.jsonl").read_text().splitlines()]

def check(ok, what):
    if not ok:
        sys.exit(f"FAILED: {what}")
    print(f"ok: {what}")

straight, split = metrics("straight"), metrics("split")
check(sorted(p.name for p in (out / "straight").glob("checkpoint-*")) == ["checkpoint-4"],
      "saves under FSDP completed (no hang); --save-total-limit 1 left only checkpoint-4")
check(any((out / "straight" / "checkpoint-4" / "accelerate_state").glob("*fsdp*")),
      "accelerate saved FSDP's sharded state")
check([r["step"] for r in straight if "heldout_kl" in r] == [0, 2, 4],
      f"held-out KL at steps 0, 2, 4 with {4 * gpus + 1} examples split unevenly over {gpus} processes (no hang)")
check(all(math.isfinite(r["loss"]) and not r.get("skipped") for r in straight if r["step"]),
      "every step's loss finite, none skipped")
check({r["on_policy"] for r in straight if r["step"]} == {True, False}, "on-policy and off-policy steps both ran")
a, b = load_file(out / "straight" / "checkpoint-4" / "model.safetensors"), \
    load_file(out / "split" / "checkpoint-4" / "model.safetensors")
check(a.keys() == b.keys() and all(t.dtype == torch.float32 for t in a.values()),
      f"the checkpoint is the whole float32 student ({len(a)} tensors), not a shard")
worst = max((a[k] - b[k]).abs().max().item() for k in a)
check(worst < 1e-3, f"stop after 2 + --resume gives the uninterrupted run's weights (max difference {worst:.2e})")
losses = [(x.get("loss"), y.get("loss")) for x, y in zip(straight, split) if x["step"]]
check(all(abs(x - y) <= 1e-3 * abs(x) + 1e-6 for x, y in losses), f"and its losses: {losses}")
rows = json.loads((out / "eval" / "results.json").read_text())["rows"]
kl = {name: row["embedded"]["heldout_kl"] for name, row in rows.items()}
check(abs(kl["teacher"]) < 1e-6 and kl["straight/checkpoint-4"] > 0,
      f"eval.py --dtype bfloat16 scored the checkpoint: held-out KL {kl}")
PY

echo "== vLLM serves the compressed-tensors export of checkpoint-4 as the student computes it =="
timeout "$LIMIT" uv run python bench/vllm_check.py "$OUT/straight/checkpoint-4" --out "$OUT/vllm"
echo "== vLLM serves NVFP4 exports (the embedded model rounded to nearest): W4A16, then W4A4 =="
timeout "$LIMIT" uv run python bench/vllm_check.py --ptq nvfp4 --out "$OUT/vllm_nvfp4"
timeout "$LIMIT" uv run python bench/vllm_check.py --ptq nvfp4 --act-quant --out "$OUT/vllm_nvfp4_w4a4"
echo "all checks passed ($OUT)"
