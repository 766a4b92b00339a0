"""An honest provider for bench/verify.py, run under another Python (another llama.cpp build).

``python bench/verify_provider.py MODEL.gguf THREADS N_CTX`` loads the model with the llama.cpp
build of the interpreter that runs it (a separate venv with only ``llama-cpp-python`` and ``numpy``:
nothing of this repository is imported) and answers one JSON line per request read from stdin,
``{"prompt": [ids], "max_tokens": n, "temperature": t, "seed": s}``, with
``{"positions": [[token, [[id, logprob], ...4]], ...], "seconds": generation time}``.

It generates the way the engine does (``runtime.inference.sampling``): the prompt in one decode,
then one token per decode; logprobs are the log-softmax of the raw logits at temperature 1, the 4
most likely committed; temperature 0 takes the most likely token, otherwise the 40 most likely are
kept, then the smallest set whose probability reaches top_p (0.95), then those at least min_p (0.05)
as likely as the best, and one is drawn at the temperature with a numpy generator seeded by ``seed``.
It stops at an end-of-generation token (not produced) or after ``max_tokens``. With
``VERIFY_PROVIDER_NO_EXTRA_BUFTS=1`` the model loads without llama.cpp's extra buffer types (weight
repacking and AMX).
"""

from __future__ import annotations

import json
import os
import sys
import time

import llama_cpp
import numpy as np

K = 4
TOP_K = 40
TOP_P = 0.95
MIN_P = 0.05


def main() -> None:
    path, threads, n_ctx = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    if os.environ.get("VERIFY_PROVIDER_NO_EXTRA_BUFTS") == "1":
        # Without llama.cpp's extra buffer types (weight repacking, AMX): a GGML_NATIVE build's AMX
        # matmul crashes (SIGSEGV) in some VMs that report AMX.
        defaults = llama_cpp.llama_cpp.llama_model_default_params

        def no_extra_bufts() -> llama_cpp.llama_model_params:
            params = defaults()
            params.use_extra_bufts = False
            return params

        llama_cpp.llama_cpp.llama_model_default_params = no_extra_bufts
    llama = llama_cpp.Llama(
        model_path=path, n_ctx=n_ctx, n_batch=512, n_threads=threads, n_threads_batch=threads, verbose=False
    )
    ctx, vocab, n_vocab = llama._ctx.ctx, llama._model.vocab, int(llama.n_vocab())
    batch = llama_cpp.llama_batch_init(n_ctx, 0, 1)
    print(json.dumps({"ready": llama_cpp.llama_print_system_info().decode()}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        prompt, temperature = request["prompt"], float(request["temperature"])
        rng = np.random.default_rng(request["seed"])
        started = time.perf_counter()
        llama._ctx.kv_cache_clear()
        positions: list[list[object]] = []
        pending, n_past = list(prompt), 0
        while len(positions) < request["max_tokens"] and n_past + len(pending) <= n_ctx:
            for j, token in enumerate(pending):
                batch.token[j], batch.pos[j], batch.n_seq_id[j] = token, n_past + j, 1
                batch.seq_id[j][0] = 0
                batch.logits[j] = j == len(pending) - 1
            batch.n_tokens = len(pending)
            if llama_cpp.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            n_past += len(pending)
            row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, len(pending) - 1), shape=(n_vocab,))
            row = row.astype(np.float64)
            logprobs = row - row.max() - np.log(np.exp(row - row.max()).sum())
            order = np.argpartition(-logprobs, TOP_K - 1)[:TOP_K]
            order = order[np.argsort(-logprobs[order], kind="stable")]
            if temperature <= 0:
                token = int(order[0])
            else:
                probs = np.exp(logprobs[order])
                probs /= probs.sum()
                keep = int(np.searchsorted(np.cumsum(probs), TOP_P) + 1)
                kept = order[:keep]
                kept = kept[logprobs[kept] >= logprobs[order[0]] + np.log(MIN_P)]
                weights = np.exp((logprobs[kept] - logprobs[kept].max()) / temperature)
                token = int(kept[rng.choice(len(kept), p=weights / weights.sum())])
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                break
            positions.append([token, [[int(i), float(logprobs[i])] for i in order[:K]]])
            pending = [token]
        print(json.dumps({"positions": positions, "seconds": time.perf_counter() - started}), flush=True)
    llama_cpp.llama_batch_free(batch)


if __name__ == "__main__":
    main()
