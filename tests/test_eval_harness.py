"""`ifp eval --lm-eval`: ifp as an lm-evaluation-harness model, on task files over local jsonl (no hub)."""

import json
import os
import subprocess
import sys

import ifp_mlx  # noqa: F401  (first: it preloads OpenBLAS before mlx.core)
import mlx.core as mx
import numpy as np
import pytest
from ifp_mlx.convert import ConvertOptions, convert
from ifp_mlx.model.load import load
from tiny import write_hf_folder

DOCS = [
    {"question": "Which is a colour?", "choices": ["red", "seven", "walk"], "answer": 0, "target": "red"},
    {"question": "Which is a number?", "choices": ["blue", "seven", "run"], "answer": 1, "target": "seven"},
    {"question": "Which is a verb?", "choices": ["green", "nine", "jump"], "answer": 2, "target": "jump"},
]
MULTIPLE_CHOICE = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""
GENERATION = """task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 3
metric_list:
  - metric: exact_match
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness")
    write_hf_folder(root / "hf", "llama", intermediate_size=64, num_hidden_layers=2)
    convert(root / "hf", root / "model", ConvertOptions())
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "tiny_mc.yaml").write_text(MULTIPLE_CHOICE.format(data=data))
    (tasks / "tiny_gen.yaml").write_text(GENERATION.format(data=data))
    return root


def ifp_eval(root, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(root / "hf-home")}
    return subprocess.run([sys.executable, "-m", "ifp_mlx.cli.main", "eval", *args], capture_output=True, text=True, env=env)


def test_harness_tasks_run_under_pruning_and_score_like_a_direct_computation(setup):
    out = setup / "harness.json"
    result = ifp_eval(setup, "--lm-eval", "tiny_mc,tiny_gen", "--lm-eval-include", str(setup / "tasks"),
                      "--model", str(setup / "model"), "--selectors", "dense,activations", "--keep", "0.5", "--json", str(out))
    assert result.returncode == 0, result.stderr
    header = next(line for line in result.stdout.splitlines() if line.startswith("selector"))
    assert header.split() == ["selector", "tiny_mc", "tiny_gen"]
    cells = json.loads(out.read_text())["cells"]
    assert set(cells) == {f"lm-eval:{t}|{s}" for t in ("tiny_mc", "tiny_gen") for s in ("dense|1", "activations|0.5")}
    assert cells["lm-eval:tiny_mc|activations|0.5"]["k"] == 32
    assert cells["lm-eval:tiny_gen|dense|1"]["metrics"]["metric"] == "exact_match,none"

    # The dense model's log-likelihoods, recomputed here from the requests the harness logged.
    loaded = load(setup / "model")
    dense = cells["lm-eval:tiny_mc|dense|1"]
    correct = []
    for sample in dense["items"]:
        scores = []
        for (context, continuation), response in zip(sample["arguments"], sample["filtered_resps"]):
            ids = loaded.tokenizer.encode(context, add_special_tokens=False)
            joint = loaded.tokenizer.encode(context + continuation, add_special_tokens=False)
            logits = loaded.model(mx.array(joint)[None])[0].astype(mx.float32)
            logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            direct = sum(logp[len(ids) - 1 + j, t].item() for j, t in enumerate(joint[len(ids):]))
            assert response[0] == pytest.approx(direct, abs=1e-4)
            scores.append(direct)
        correct.append(int(np.argmax(scores)) == sample["doc"]["answer"])
    assert dense["metrics"]["accuracy"] == pytest.approx(np.mean(correct))


def test_the_oracle_is_refused_with_harness_tasks(setup):
    result = ifp_eval(setup, "--lm-eval", "tiny_mc", "--lm-eval-include", str(setup / "tasks"),
                      "--model", str(setup / "model"), "--selectors", "oracle")
    assert result.returncode == 2 and "the oracle needs reference answers" in result.stderr, result.stderr
