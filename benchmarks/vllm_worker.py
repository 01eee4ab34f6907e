"""Runs inside an environment that has vLLM (not elastic-moe): loads each exported folder with vLLM's own
`LLM`, no custom code, and records greedy tokens with their log-probs and the log-prob of every prompt token.

    python benchmarks/vllm_worker.py JOB.json RESULT.json

JOB.json: {"cases": [{"name": ..., "path": HF_DIR, "prompts": [[ids...], ...], "new_tokens": N,
"tokenizer": bool}]}. RESULT.json is rewritten after every case, so a crash keeps the cases before it.
Started by `benchmarks/vllm_parity.py`.
"""

import gc
import json
import os
import sys
import time


def run_case(case: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t = time.perf_counter()
    llm = LLM(model=case["path"], dtype="float32", enforce_eager=True, max_model_len=512, seed=0,
              skip_tokenizer_init=not case["tokenizer"])
    load_s = time.perf_counter() - t
    params = SamplingParams(temperature=0.0, max_tokens=case["new_tokens"], logprobs=1, prompt_logprobs=0,
                            ignore_eos=True, detokenize=case["tokenizer"])
    t = time.perf_counter()
    results = llm.generate([TokensPrompt(prompt_token_ids=p) for p in case["prompts"]], params, use_tqdm=False)
    generate_s = time.perf_counter() - t
    outputs = []
    for prompt, r in zip(case["prompts"], results):
        o = r.outputs[0]
        prompt_lp = [d[tok].logprob for tok, d in zip(prompt[1:], r.prompt_logprobs[1:])]
        outputs.append({"tokens": list(o.token_ids), "logprobs": [d[tok].logprob for tok, d in zip(o.token_ids, o.logprobs)],
                        "prompt_logprobs": prompt_lp, "text": o.text if case["tokenizer"] else None})
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    return {"name": case["name"], "load_s": load_s, "generate_s": generate_s, "outputs": outputs}


def main() -> None:
    job_path, out_path = sys.argv[1], sys.argv[2]
    import vllm

    job = json.load(open(job_path))
    done = {"vllm": vllm.__version__, "cases": []}
    for i, case in enumerate(job["cases"]):
        print(f"[vllm] case {i + 1}/{len(job['cases'])}: {case['name']}", flush=True)
        try:
            done["cases"].append(run_case(case))
        except Exception as e:  # noqa: BLE001 - a folder vLLM cannot load is a result to report
            done["cases"].append({"name": case["name"], "error": f"{type(e).__name__}: {e}"[:2000]})
        tmp = out_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(done, f)
        os.replace(tmp, out_path)


if __name__ == "__main__":  # vLLM starts its engine in a spawned process, which re-imports this file
    main()
