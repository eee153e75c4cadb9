"""`ifp eval`'s scorers against direct computations, and its grid, resume, tables and figures.

Tiny random models (tests/tiny.py) keep every test fast; nothing is mocked:
the scorers run the real model, the CLI runs as a user runs it.
"""

import json
import os
import subprocess
import sys

import ifp_mlx  # noqa: F401  (first: it preloads OpenBLAS before mlx.core)
import mlx.core as mx
import numpy as np
import pytest
from ifp_mlx.convert import ConvertOptions, convert
from ifp_mlx.data.builders import knowledge_records
from ifp_mlx.engine.prompts import chat_tokens
from ifp_mlx.evaluate import gsm
from ifp_mlx.evaluate.mmlu import LETTERS, choice_tokens, messages, questions, score_question
from ifp_mlx.evaluate.nll import continuation_logprobs, response_nll
from ifp_mlx.evaluate.oracle import OracleSelector
from ifp_mlx.evaluate.overlap import pack_mask, unpack_mask
from ifp_mlx.evaluate.results import EVAL_SELECTORS, Results
from ifp_mlx.errors import IFPError
from ifp_mlx.gather.backend import gather
from ifp_mlx.model.load import load
from ifp_mlx.select.activations import ActivationScores
from ifp_mlx.select.base import top_k
from ifp_mlx.select.choose import SELECTORS
from tiny import write_hf_folder

IFP = [sys.executable, "-m", "ifp_mlx.cli.main"]


def ifp_eval(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*IFP, "eval", *args], capture_output=True, text=True, env=os.environ.copy())


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-eval")
    write_hf_folder(root / "hf", "llama", intermediate_size=64, num_hidden_layers=2)
    convert(root / "hf", root / "model", ConvertOptions())
    return root / "model"


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load(tiny_dir, dense=False)


def direct_logprob(model, context: list[int], continuation: list[int]) -> float:
    """log p(continuation | context) from one forward pass over both, summed by hand in numpy."""
    logits = np.array(model(mx.array(context + continuation)[None])[0].astype(mx.float32))
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    return float(sum(logp[len(context) - 1 + j, token] for j, token in enumerate(continuation)))


def test_response_nll_matches_a_token_by_token_computation(tiny):
    prompt, response = [256, 10, 20, 30], [40, 50, 60, 70, 80]
    rng = np.random.default_rng(0)
    pruned = np.sort(np.stack([rng.choice(tiny.d_ff, 32, replace=False) for _ in range(tiny.num_layers)]), axis=1)
    for ffn in (tiny.dense_ffn(), gather(tiny.bank(), mx.array(pruned.astype(np.uint32)))):
        tiny.assign(ffn)
        expected = []
        for i, token in enumerate(response):  # each response token from its own forward pass
            logits = tiny.model(mx.array(prompt + response[:i])[None])[0, -1].astype(mx.float32)
            expected.append(-(logits[token] - mx.logsumexp(logits)).item())
        assert response_nll(tiny, prompt, response) == pytest.approx(float(np.mean(expected)), abs=1e-4)


def test_continuation_logprobs_match_direct_sums_and_know_greedy(tiny):
    tiny.assign(tiny.dense_ffn())
    context = [256, 5, 6, 7, 8]
    greedy, tokens = [], list(context)
    for _ in range(3):
        nxt = int(mx.argmax(tiny.model(mx.array(tokens)[None])[0, -1]).item())
        greedy.append(nxt)
        tokens.append(nxt)
    other = [(greedy[0] + 1) % 300, 9, 10]
    scores = continuation_logprobs(tiny.model, context, [greedy, other, [greedy[0]], [11]])
    for (logprob, _), continuation in zip(scores, [greedy, other, [greedy[0]], [11]]):
        assert logprob == pytest.approx(direct_logprob(tiny.model, context, continuation), abs=1e-4)
    assert [g for _, g in scores] == [True, False, True, greedy[0] == 11]


def test_mmlu_scorer_on_a_hand_made_question(tiny):
    tiny.assign(tiny.dense_ffn())
    question = {"prompt": "What is 2 + 2?\n\nA) 3\nB) 4\nC) 5\nD) 22", "response": "The answer is B) 4."}
    prompt = chat_tokens(tiny.tokenizer, messages(question, []))
    prefix, choices = choice_tokens(tiny)
    row = score_question(tiny, prompt + prefix, choices, "B")
    direct = [direct_logprob(tiny.model, prompt + prefix, c) for c in choices]
    assert row["logprobs"] == pytest.approx(direct, abs=1e-4)
    assert row["predicted"] == LETTERS[int(np.argmax(direct))]
    assert row["correct"] == (row["predicted"] == "B") and row["nll"] == pytest.approx(-direct[1], abs=1e-4)
    shots = messages(question, [question, question])
    assert [m["role"] for m in shots] == ["user", "assistant", "user", "assistant", "user"]


def test_mmlu_questions_leave_out_the_shots_and_take_subjects_in_turn():
    shots, ordered = questions()
    assert len(shots) == 57 and all(len(s) == 5 for s in shots.values())
    shot_ids = {r["id"] for s in shots.values() for r in s}
    assert len(shot_ids) == 57 * 5 and not shot_ids & {r["id"] for r in ordered}  # nor their twins: MMLU repeats some
    assert shot_ids | {r["id"] for r in ordered} == {r["id"] for r in knowledge_records()}
    assert len({r["meta"]["topic"] for r in ordered[:57]}) == 57


def test_math_scorer_on_a_right_and_a_wrong_answer():
    problems = gsm.dataset()
    entry = problems[0]
    answer = str(entry["answer"])
    right = f"Add the two groups first.\nThe answer is {answer}."
    assert gsm.final_answer(right) == answer and problems.score_answer(gsm.final_answer(right), entry) == 1.0
    wrong = f"Add the two groups first, 3 + 4 = 7.\nThe answer is {int(answer) + 1}."
    assert problems.score_answer(gsm.final_answer(wrong), entry) < 1.0
    assert gsm.final_answer("so <answer>1,260</answer>") == "1260"
    assert gsm.final_answer("3 + 4 = 7 apples") == "7" and gsm.final_answer("no idea") is None
    assert gsm.answer_stated("The answer is 12.") and not gsm.answer_stated("The answer is 12")
    assert gsm.dataset()[3] == problems[3]  # fixed seed and size: the same items every run


def test_oracle_scores_only_the_reference(tiny):
    oracle = OracleSelector(tiny)
    prompt, reference = [256, 3, 4, 5, 6, 7], [8, 9, 10, 11]
    with pytest.raises(IFPError, match="reference answer"):
        oracle.select(prompt, 16)
    oracle.reference = reference
    chosen = np.array(oracle.select(prompt, 16).indices)
    scores = ActivationScores(tiny)
    scores.run(prompt + reference, skip=len(prompt))
    assert scores.tokens == len(reference)
    assert (chosen == np.array(top_k(scores.sums, 16))).all()
    assert (unpack_mask(pack_mask(chosen, tiny.d_ff), tiny.num_layers, tiny.d_ff) == chosen).all()


def _heldout(tmp_path):
    records = [{"id": f"{d}-{i}", "domain": d, "prompt": f"{d} question {i}", "response": f"answer {i} for {d}"}
               for d in ("code", "instructions") for i in range(2)]
    path = tmp_path / "heldout.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_resume_runs_only_the_cells_not_in_the_results_file(tiny_dir, tmp_path):
    out = tmp_path / "results.json"
    args = [str(_heldout(tmp_path)), "--model", str(tiny_dir), "--selectors", "dense,random,activations",
            "--keep", "0.5,0.25", "--json", str(out)]
    first = ifp_eval(*args)
    assert first.returncode == 0, first.stderr
    report = json.loads(out.read_text())
    keys = {"nll|dense|1", "nll|random|0.5", "nll|random|0.25", "nll|activations|0.5", "nll|activations|0.25"}
    assert set(report["cells"]) == keys
    # As if interrupted after two cells; one finished cell marked, so a recomputation would show.
    report["cells"] = {k: v for k, v in report["cells"].items() if k in ("nll|dense|1", "nll|random|0.5")}
    report["cells"]["nll|random|0.5"]["metrics"]["domains"]["code"] = 123.0
    out.write_text(json.dumps(report))
    again = ifp_eval(*args, "--resume")
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("not rerun") == 2
    row = next(line.split() for line in again.stdout.splitlines() if line.startswith("random ") and " 0.5 " in line)
    assert row[2] == "123.000"  # read from the file, not recomputed
    after = json.loads(out.read_text())
    assert set(after["cells"]) == keys and after["cells"]["nll|dense|1"] == report["cells"]["nll|dense|1"]
    settings = after["settings"]
    with pytest.raises(IFPError, match="already exists: --resume continues its run, --force starts over"):
        Results.start(out, settings)
    with pytest.raises(IFPError, match="made with max_tokens None, this run has 5"):
        Results.start(out, {**settings, "max_tokens": 5}, resume=True)
    wider = ifp_eval(*args, "--resume", "--limit", "1")  # another limit: the cells ran on other items, so all rerun
    assert wider.returncode == 0 and wider.stderr.count("rerun with 1") == 5, wider.stderr
    assert all(c["limit"] == 1 and c["metrics"]["n"] == 2 for c in json.loads(out.read_text())["cells"].values())


def test_every_task_in_one_grid_prints_in_80_columns_with_figures(tiny_dir, tmp_path):
    out, figures = tmp_path / "grid.json", tmp_path / "figures"
    result = ifp_eval("--tasks", "all", "--model", str(tiny_dir), "--selectors", "dense,activations,oracle",
                 "--keep", "1.0,0.5,0.33", "--limit", "1,mmlu-0shot=2", "--max-tokens", "4",
                 "--json", str(out), "--plot", str(figures))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80 and "…" not in result.stdout, result.stdout
    header = next(line for line in lines if line.startswith("selector"))
    assert header.split() == ["selector", "keep", "humaneval", "math", "mmlu-0shot", "mmlu-5shot"]
    labels = [tuple(line.split()[:2]) for line in lines[lines.index(header) + 1 :] if line.strip()][:5]
    assert labels == [("dense", "1"), ("activations", "0.5"), ("activations", "0.33"), ("oracle", "0.5"), ("oracle", "0.33")]
    report = json.loads(out.read_text())
    assert len(report["cells"]) == 4 * 5 and report["sandbox"]["environment"] == "empty"
    code = report["cells"]["humaneval|oracle|0.33"]
    assert code["k"] == 24 and code["items"][0]["status"] in ("passed", "failed", "timeout", "killed")
    assert code["items"][0]["mask"] and report["cells"]["humaneval|dense|1"]["items"][0]["mask"] is None
    assert len(report["cells"]["mmlu-0shot|dense|1"]["items"]) == 2
    assert set(report["cells"]["mmlu-5shot|oracle|0.5"]["metrics"]["subjects"]) <= set(questions()[0])
    summary = {(r["selector"], r["keep"]): r for r in report["summary"]}
    assert set(summary[("activations", 0.5)]["overlap_per_layer"]) >= {"knowledge x knowledge", "code x math", "knowledge x math"}
    for name in ("accuracy.png", "nll.png", "overlap.png"):
        assert (figures / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_options_fail_in_one_line_before_loading(tmp_path):
    assert EVAL_SELECTORS == (*SELECTORS, "oracle")  # checked before select.choose is imported
    missing = str(tmp_path / "no-model")
    assert "nothing to evaluate" in one_line_error(ifp_eval("--model", missing))
    assert "unknown task" in one_line_error(ifp_eval("--tasks", "humaneval,trivia", "--model", missing))
    assert "--keep" in one_line_error(ifp_eval("--tasks", "math", "--keep", "0.5,1.5", "--model", missing))
    assert "unknown selector" in one_line_error(ifp_eval("--tasks", "math", "--selectors", "dense,best", "--model", missing))
    assert "--limit" in one_line_error(ifp_eval("--tasks", "math", "--limit", "humaneval=3", "--model", missing))


def test_an_evaluation_engine_holds_one_submodel_whatever_the_items(tiny):
    """The fit check budgets the bank and one submodel; an eval cell's items never reuse one."""
    from ifp_mlx.evaluate.grid import SelectorOptions, make_engine

    engine = make_engine(tiny, "activations", 0.5, SelectorOptions())
    kept = set()
    for prompt in ([256, 3, 4, 5], [256, 90, 91, 92, 93, 94], [256, 200, 7, 7, 7]):
        selection = engine.select(prompt)
        engine.use(selection)
        kept.add(selection.key)
        assert len(engine.submodels) == 1 and selection.key in engine.submodels
    assert len(kept) == 3 and engine.gathers == 3
