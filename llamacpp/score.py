"""Score token sequences with llama.cpp itself: the log-probabilities its kernels give each
next token, for comparing a GGUF export with the student it came from (engines.py).

Runs in the llamacpp/ environment (llama-cpp-python compiles llama.cpp on install):

    uv run --project llamacpp python llamacpp/score.py MODEL.gguf REQUEST.json OUT.npz

REQUEST.json: {"sequences": [[token ids], ...], "texts": ["text", ...]}. OUT.npz:
``logprobs_<i>`` [len(sequence i), vocab] float32, the log-softmax of llama.cpp's logits at
every position of sequence i; ``tokens_<j>``, llama.cpp's tokens of text j (no BOS added,
control tokens not parsed); ``vocab``, llama.cpp's vocabulary size.
"""

import json
import os
import sys

import numpy as np


def main(argv) -> int:
    if len(argv) != 3:
        print("usage: score.py MODEL.gguf REQUEST.json OUT.npz", file=sys.stderr)
        return 2
    model, request, out = argv
    import llama_cpp.llama_cpp as bindings
    from llama_cpp import Llama

    # No extra buffer types (weights repacked for AMX or other CPU-specific kernels): they
    # are a per-CPU choice, and AMX faults in a VM that reports it but does not grant the
    # tile state. The plain CPU kernels compute the same formats.
    default_params = bindings.llama_model_default_params

    def without_extra_buffers():
        params = default_params()
        params.use_extra_bufts = False
        return params

    bindings.llama_model_default_params = without_extra_buffers

    request = json.loads(open(request).read())
    sequences, texts = request.get("sequences", []), request.get("texts", [])
    longest = max([len(s) for s in sequences] + [16])
    llm = Llama(model_path=model, n_ctx=longest, n_batch=longest, n_ubatch=longest, logits_all=True,
                n_threads=int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1), verbose=False)
    arrays = {"vocab": np.array(llm.n_vocab())}
    for i, tokens in enumerate(sequences):
        llm.reset()
        llm.eval(tokens)
        logits = np.array(llm.scores[:len(tokens)], dtype=np.float64)
        logits -= logits.max(-1, keepdims=True)
        arrays[f"logprobs_{i}"] = (logits - np.log(np.exp(logits).sum(-1, keepdims=True))).astype(np.float32)
    for j, text in enumerate(texts):
        arrays[f"tokens_{j}"] = np.array(llm.tokenize(text.encode(), add_bos=False, special=False), dtype=np.int64)
    np.savez(out, **arrays)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
