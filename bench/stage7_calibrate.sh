#!/bin/bash
# RESULTS.md stage 7: the seconds a step of each arm takes (median of steps 2-6), to size runs
# of equal training minutes. Needs stage 6's MXFP4 GPTQ start (its command is in RESULTS.md).
#   bash bench/stage7_calibrate.sh   -> results/study/stage7/calibration.json
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
START=dump/gptq_actorder/mxfp4_mse/checkpoint-0
for arm in "lmbda0:--lmbda 0" "lmbda1:--lmbda 1" "seqkd:--lmbda 0 --seq-kd"; do
  name=${arm%%:*}; flags=${arm#*:}
  [ -f dump/study/stage7_calibration/$name/checkpoint-6/config.json ] && continue
  nice -n 5 uv run python train.py --student-model $START $flags --quant-type mxfp4 --scale-rule mse --learning-rate 1e-4 --max-steps 6 --max-new-tokens 256 --eval-steps 0 --seed 42 --overwrite --output_dir dump/study/stage7_calibration/$name
done
uv run python - <<'PY'
import json, statistics, pathlib
out = {}
for d in sorted(pathlib.Path("dump/study/stage7_calibration").iterdir()):
    rows = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r.get("step", 0) >= 2 and "step_s" in r]
    out[d.name] = {"median_step_s": statistics.median(r["step_s"] for r in steps),
                   "median_generation_s": statistics.median(r["generation_s"] for r in steps), "steps": len(steps)}
pathlib.Path("results/study/stage7").mkdir(parents=True, exist_ok=True)
pathlib.Path("results/study/stage7/calibration.json").write_text(json.dumps(out, indent=1))
print(out)
PY
