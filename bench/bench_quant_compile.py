"""Does compiling the mse rule's elementwise passes pay? (issue 28)

The MXFP4 ``mse`` rule runs three candidate quantizations over every weight at every
student forward (``quant._mse_candidates``): memory-bound elementwise passes that
``torch.compile`` can fuse. This times ``fake_quantize(w, "mxfp4", scale_rule="mse")`` over
all of the embedded model's quantized weights, eager against the candidate pass compiled
(static shapes: one graph per weight shape), alternated in one process, and checks that the
quantized weights are equal bit for bit (the compiled float32 error sums may add in another
order; the rule's float64 screen decides every block whose float32 sums are close).

    uv run python bench/bench_quant_compile.py [--repeats 5] [--threads N]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import quant  # noqa: E402
from models import load_model  # noqa: E402


def quantize_all(weights) -> list[torch.Tensor]:
    return [quant.fake_quantize(w, "mxfp4", scale_rule="mse") for w in weights]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_model(None)
    weights = [m.weight.detach() for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name != "lm_head"]
    eager_candidates = quant._mse_candidates
    compiled_candidates = torch.compile(eager_candidates, dynamic=False)
    started = time.perf_counter()
    quant._mse_candidates = compiled_candidates
    compiled_out = quantize_all(weights)  # compiles each shape once
    compile_s = time.perf_counter() - started
    quant._mse_candidates = eager_candidates
    equal = all(torch.equal(a, b) for a, b in zip(quantize_all(weights), compiled_out))
    times = {"eager": [], "compiled": []}
    for _ in range(args.repeats):
        for name, candidates in (("eager", eager_candidates), ("compiled", compiled_candidates)):
            quant._mse_candidates = candidates
            begun = time.perf_counter()
            quantize_all(weights)
            times[name].append(time.perf_counter() - begun)
    quant._mse_candidates = eager_candidates
    eager, compiled = statistics.median(times["eager"]), statistics.median(times["compiled"])
    print(f"{len(weights)} weights, {args.threads} threads; first compiled pass (compilation included) {compile_s:.1f} s")
    print(f"all weights, median of {args.repeats}: eager {eager:.3f} s, compiled {compiled:.3f} s "
          f"({eager / compiled:.2f}x); equal bit for bit: {equal}")
    print("eager:", " ".join(f"{t:.3f}" for t in times["eager"]))
    print("compiled:", " ".join(f"{t:.3f}" for t in times["compiled"]))


if __name__ == "__main__":
    main()
