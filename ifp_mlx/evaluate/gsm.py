"""Math: exact match on reasoning-gym's GSM-style word problems (``gsm_symbolic``), by its own scorer.

The problems are generated with a fixed seed and size, so item i is the same
whatever ``--limit`` is; the seed is far from the data builder's (``ifp data
build --seed``, 0 by default, uses seeds 0..size), so no evaluated problem is
a training problem (the templates are shared, the numbers are not). The
final answer is read from the reply (an ``<answer>`` tag, else "the answer
is X", else "#### X", else its last number) and scored by the dataset's
``score_answer``; exact match is a score of 1.
"""

import re
from typing import Optional

from ..engine.engine import Engine
from ..engine.prompts import prompt_tokens
from ..errors import IFPError
from ..model.load import LoadedModel
from ..select.base import Selection
from .tasks import Item, ItemTask, generate, mean, reference_tokens

DATASET = "gsm_symbolic"
SEED = 1_000_003
SIZE = 1000  # problems generated; --limit takes the first
MAX_TOKENS = 256
NUMBER = r"-?\d[\d,]*(?:\.\d+)?"
STATED = re.compile(rf"(?:answer is|####)[:\s]*\$?\s*({NUMBER})", re.IGNORECASE)
STATED_AND_ENDED = re.compile(rf"(?:answer is|####)[:\s]*\$?\s*{NUMBER}(?=[^\d,.]|\.(?:\s|$))", re.IGNORECASE)


def final_answer(reply: str) -> Optional[str]:
    """The answer a reply states, as a number string without thousands separators (None: no number)."""
    from reasoning_gym.utils import extract_answer

    tagged = extract_answer(reply)
    if tagged is not None:
        return tagged.replace(",", "")
    stated = STATED.findall(reply)
    numbers = stated or re.findall(NUMBER, reply)
    return numbers[-1].replace(",", "").rstrip(".") if numbers else None


def answer_stated(text: str) -> bool:
    """The reply has given its final answer (generation can stop)."""
    return "</answer>" in text or STATED_AND_ENDED.search(text) is not None


def reference_answer(item: dict) -> str:
    """The worked solution as the training data writes it: the steps, then "The answer is X."."""
    steps = re.sub(r"\n?####[^\n]*\s*$", "", item["metadata"].get("answer_cot", "").strip()).strip()
    answer = str(item["answer"]).strip()
    return f"{steps}\nThe answer is {answer}." if steps else f"The answer is {answer}."


def dataset():
    try:
        import reasoning_gym
    except ImportError:
        raise IFPError("the math task needs reasoning-gym: pip install reasoning-gym==0.1.25") from None
    return reasoning_gym.create_dataset(DATASET, size=SIZE, seed=SEED)


class MathTask(ItemTask):
    name = "math"

    def __init__(self, max_tokens: Optional[int] = None):
        self.max_tokens = max_tokens or MAX_TOKENS
        self.problems = None

    def items(self, loaded: LoadedModel, limit: Optional[int]) -> list[Item]:
        self.problems = dataset()
        count = SIZE if limit is None else min(limit, SIZE)
        items = []
        for index in range(count):
            problem = self.problems[index]
            items.append(Item(
                f"{DATASET}-{SEED}-{index}", "math", prompt_tokens(loaded.tokenizer, problem["question"]),
                reference_tokens(loaded, reference_answer(problem)), {"index": index, "answer": str(problem["answer"])},
            ))
        return items

    def score(self, engine: Engine, item: Item, selection: Selection) -> dict:
        reply, tokens = generate(engine, item.prompt, selection, self.max_tokens, stop=answer_stated)
        answer = final_answer(reply)
        score = self.problems.score_answer(answer, self.problems[item.data["index"]])
        return {"reply": reply, "tokens": tokens, "answer": answer, "expected": item.data["answer"],
                "score": score, "correct": score == 1.0}

    def metrics(self, rows: list[dict]) -> dict:
        return {"accuracy": mean([float(r["correct"]) for r in rows]), "nll": mean([r["nll"] for r in rows]), "n": len(rows)}
