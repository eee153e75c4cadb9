"""The data format: one jsonl record per line, ids that hash the content, splits from ids.

SFT pairs are ``{"id", "domain", "prompt", "response"}``, prose is ``{"id",
"domain": "prose", "text"}``, optionally with ``"source"`` and ``"meta"``
(docs/DATA.md). Ids hash the item's content and the split is a hash of the id
alone, so an item's split never depends on the order, the limit or the other
items: rebuilding with other options can never move a held-out item into train.
"""

import hashlib
import json
from pathlib import Path
from typing import Iterable, Optional

from ..errors import IFPError
from ..files import atomic_file

DOMAINS = ("code", "math", "knowledge", "instructions", "prose")
SPLITS = ("train", "heldout")
HELDOUT_FRACTION = 0.1


# ---------------------------------------------------------------- ids and splits


def make_id(domain: str, key: str) -> str:
    """A stable id from an item's content: equal prompts (or texts) get one id, hence one split."""
    return f"{domain}-{hashlib.sha256(key.encode('utf-8')).hexdigest()[:16]}"


def _unit(item_id: str) -> float:
    """The id hashed to [0, 1)."""
    return int.from_bytes(hashlib.sha256(item_id.encode("utf-8")).digest()[:8], "big") / 2**64


def check_fraction(heldout_fraction: float) -> None:
    if not 0 <= heldout_fraction < 1:
        raise IFPError(f"the held-out fraction must be in [0, 1), got {heldout_fraction}")


def split_of(item_id: str, heldout_fraction: float = HELDOUT_FRACTION) -> str:
    """``"heldout"`` for a fixed ``heldout_fraction`` of ids, else ``"train"``.

    A function of the id alone. Raising the fraction only moves items from
    train to held-out, never back.
    """
    check_fraction(heldout_fraction)
    return "heldout" if _unit(item_id) < heldout_fraction else "train"


# ---------------------------------------------------------------- records and files


def check_record(record, where: str) -> dict:
    """The record if it follows docs/DATA.md, else a one-line IFPError starting with ``where``."""
    if not isinstance(record, dict):
        raise IFPError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for field in ("id", "domain"):
        if not isinstance(record.get(field), str) or not record[field].strip():
            raise IFPError(f"{where}: {field!r} must be a non-empty string")
    fields = ("text",) if record["domain"] == "prose" else ("prompt", "response")
    for field in fields:
        if not isinstance(record.get(field), str) or not record[field].strip():
            kind = "prose" if fields == ("text",) else f"a {record['domain']!r}"
            raise IFPError(f"{where}: {kind} record needs a non-empty string {field!r}")
    if "source" in record and not isinstance(record["source"], str):
        raise IFPError(f"{where}: 'source' must be a string")
    if "meta" in record and not isinstance(record["meta"], dict):
        raise IFPError(f"{where}: 'meta' must be a JSON object")
    return record


def read_records(path: Path) -> list[dict]:
    """Validated records of a jsonl file (blank lines skipped); errors name ``file:line``."""
    path = Path(path)
    if not path.is_file():
        raise IFPError(f"{path}: no such file")
    records, first_line = [], {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise IFPError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            check_record(record, where)
            if record["id"] in first_line:
                raise IFPError(f"{where}: duplicate id {record['id']!r} (first on line {first_line[record['id']]})")
            first_line[record["id"]] = number
            records.append(record)
    return records


def split_records(records: Iterable[dict], heldout_fraction: float = HELDOUT_FRACTION) -> dict[str, list[dict]]:
    """Records by split (``split_of`` their id), in their given order."""
    splits = {split: [] for split in SPLITS}
    for record in records:
        splits[split_of(record["id"], heldout_fraction)].append(record)
    return splits


def write_records(path: Path, records: Iterable[dict]) -> int:
    """Write jsonl atomically (a temporary file renamed into place); returns the count."""
    count = 0
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count


def select(records: Iterable[dict], limit: Optional[int]) -> list[dict]:
    """Unique records in id order, the first ``limit`` of them.

    Ids are content hashes, so id order is a fixed shuffle: a limit samples
    across the whole source (not its first files or topics), and a smaller
    limit keeps a subset of a larger one.
    """
    unique = {}
    for record in records:
        unique.setdefault(record["id"], record)
    return [unique[i] for i in sorted(unique)[:limit]]
