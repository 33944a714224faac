#!/bin/bash
# issue 27, stage 7 (RESULTS.md planned stages, item 3); $1: "a" (lambda 0, then 0.5) or "b" (lambda 1, then seq-kd). Rerun to resume.
cd /work/main
export OMP_NUM_THREADS=1
START=dump/gptq_actorder/mxfp4_mse/checkpoint-0
arm() {  # grid, steps, eval/save steps
  nice -n 5 uv run python sweep.py --grid $1 --seeds 3 --root dump/study/stage7 --results results/study/stage7 --eval "--tasks '' --no-perplexity --embedded --max-new-tokens 256" -- --student-model $START --learning-rate 1e-4 --max-new-tokens 256 --max-steps $2 --eval-steps $3 --save-steps $3 --save-total-limit 1
}
if [ "$1" = a ]; then arm lmbda=0 110 22; arm lmbda=0.5 52 13; else arm lmbda=1 34 7; arm "seq_kd=true lmbda=0" 25 5; fi
