"""Building the sandbox image (``sandbox/Dockerfile`` plus the worker) on one or more engines.

Two ways to the base the Dockerfile builds on, tried in order:

1. ``registry``: ``python:3.12-slim`` is on the engine already or the engine can pull it (the
   ordinary path on a user's machine);
2. ``local``: no registry answers, so a Debian base is made on this machine:
   ``debootstrap --variant=minbase --include=python3,nodejs bookworm DIR``, then
   ``tar -C DIR -c . | docker import - tracegen-sandbox-base:bookworm-python3-nodejs`` (needs root
   and debootstrap; a few minutes). A base made earlier is reused unless ``rebuild_base``; its tag
   names its packages, so a base made before a package was added is not.

The worker layer is then built from the same Dockerfile with ``--build-arg BASE=<base>`` (it installs
``nodejs`` with apt only when the base lacks ``node``). The image is labelled with
:func:`sandbox_digest`, which the Docker tests compare with the source tree. With several engines
the image is built on the first and copied to the others (``docker save | load``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NamedTuple

from tracegen.errors import RuntimeToolError, TracegenError
from tracegen.runtime.docker.settings import DEFAULT_IMAGE

if TYPE_CHECKING:
    import docker

REGISTRY_BASE = "python:3.12-slim"
DEBIAN_SUITE = "bookworm"
LOCAL_PACKAGES = ("python3", "nodejs")  # the worker and python tool; node for javascript tests
LOCAL_BASE = f"tracegen-sandbox-base:{DEBIAN_SUITE}-{'-'.join(LOCAL_PACKAGES)}"
DIGEST_LABEL = "tracegen.sandbox-sha256"

BasePath = Literal["registry", "local"]


class BuildResult(NamedTuple):
    image: str
    base: str
    path: BasePath
    """``registry``: the base came from (or was already pulled from) a registry; ``local``: bootstrapped here."""
    bootstrapped: bool
    """True when this build ran debootstrap (False when it reused a local base made earlier)."""


def sandbox_dir() -> Path:
    """The ``sandbox/`` folder of the source tree (Dockerfile and worker)."""
    here = Path(__file__).resolve().parents[2] / "sandbox"
    if not (here / "Dockerfile").is_file() or not (here / "worker.py").is_file():
        raise TracegenError(
            f"cannot find the sandbox image definition at {here}",
            hint="build from a source checkout of tracegen (the sandbox/ folder is not in the wheel)",
        )
    return here


def sandbox_digest() -> str:
    """What the image is built from: the Dockerfile, the worker and the offline base's packages."""
    h = hashlib.sha256()
    for part in ((sandbox_dir() / "Dockerfile").read_bytes(), (sandbox_dir() / "worker.py").read_bytes()):
        h.update(hashlib.sha256(part).digest())
    h.update(" ".join(LOCAL_PACKAGES).encode())
    return h.hexdigest()[:16]


def build_image(
    client: docker.DockerClient,
    tag: str = DEFAULT_IMAGE,
    base: str = REGISTRY_BASE,
    rebuild_base: bool = False,
    say: Callable[[str], None] | None = None,
) -> BuildResult:
    """Build ``tag`` on the engine behind ``client``; ``say`` receives progress lines."""
    import docker.errors

    say = say or (lambda line: print(line, file=sys.stderr))
    chosen, path, bootstrapped = _base_image(client, base, rebuild_base, say)
    say(f"building {tag} from {chosen} ({sandbox_dir() / 'Dockerfile'})")
    try:
        client.images.build(
            path=str(sandbox_dir()),
            tag=tag,
            buildargs={"BASE": chosen},
            labels={DIGEST_LABEL: sandbox_digest(), "tracegen.base": chosen},  # the digest covers the worker
            rm=True,
            forcerm=True,
            pull=False,
        )
    except (docker.errors.BuildError, docker.errors.APIError) as exc:
        raise RuntimeToolError(f"building {tag} failed: {_build_log_tail(exc)}") from exc
    return BuildResult(tag, chosen, path, bootstrapped)


def _base_image(
    client: docker.DockerClient, base: str, rebuild_base: bool, say: Callable[[str], None]
) -> tuple[str, BasePath, bool]:
    import docker.errors

    if _has_image(client, base):
        return base, "registry", False
    try:
        say(f"pulling {base}")
        client.images.pull(base)
        return base, "registry", False
    except docker.errors.APIError as exc:
        say(f"cannot pull {base} ({_first_line(exc)}); falling back to a locally bootstrapped Debian base")
    if _has_image(client, LOCAL_BASE) and not rebuild_base:
        say(f"reusing the local base {LOCAL_BASE} (pass --rebuild-base to bootstrap it again)")
        return LOCAL_BASE, "local", False
    bootstrap_base(client, LOCAL_BASE, say)
    return LOCAL_BASE, "local", True


def _has_image(client: docker.DockerClient, name: str) -> bool:
    import docker.errors

    try:
        client.api.inspect_image(name)
    except docker.errors.ImageNotFound:
        return False
    return True


def bootstrap_base(client: docker.DockerClient, name: str = LOCAL_BASE, say: Callable[[str], None] = print) -> None:
    """``debootstrap --variant=minbase --include=python3,nodejs bookworm DIR``, then import DIR as ``name``."""
    if shutil.which("debootstrap") is None:
        raise RuntimeToolError(
            "no registry answers and debootstrap is not installed, so no base image can be made",
            hint="as root: apt-get install debootstrap (or run scripts/provision_docker.sh), "
            "or make python:3.12-slim reachable",
        )
    if os.geteuid() != 0:
        raise RuntimeToolError("bootstrapping the offline base image needs root (debootstrap)", hint="run as root")
    include = f"--include={','.join(LOCAL_PACKAGES)}"
    with _scratch_dir() as root:
        say(f"debootstrap --variant=minbase {include} {DEBIAN_SUITE} {root} (a few minutes)")
        done = subprocess.run(
            ["debootstrap", "--variant=minbase", include, DEBIAN_SUITE, str(root)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            tail = "\n".join(done.stdout.strip().splitlines()[-5:])
            raise RuntimeToolError(f"debootstrap failed (exit {done.returncode}): {tail}")
        say(f"tar -C {root} -c . | docker import - {name}")
        repository, _, tag = name.partition(":")
        tar = subprocess.Popen(["tar", "--numeric-owner", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        assert tar.stdout is not None
        try:
            client.api.import_image_from_stream(_chunks(tar.stdout), repository=repository, tag=tag or "latest")
        finally:
            tar.stdout.close()
            code = tar.wait()
        if code != 0:
            raise RuntimeToolError(f"tar of the bootstrapped tree failed (exit {code})")


def _chunks(stream: object, size: int = 1 << 20) -> Iterator[bytes]:
    read = getattr(stream, "read")  # noqa: B009  # any binary file object
    while chunk := read(size):
        yield chunk


@contextlib.contextmanager
def _scratch_dir() -> Iterator[Path]:
    # /var/tmp: the tree is ~300 MB, more than a tmpfs /tmp may hold.
    path = Path(tempfile.mkdtemp(prefix="tracegen-debootstrap-", dir="/var/tmp" if Path("/var/tmp").is_dir() else None))
    try:
        yield path / "root"
    finally:
        shutil.rmtree(path, ignore_errors=True)


def copy_image(src: docker.DockerClient, dst: docker.DockerClient, name: str) -> None:
    """``docker save NAME | docker -H DST load``, streamed."""
    dst.api.load_image(src.api.get_image(name))


def _first_line(exc: BaseException) -> str:
    """The engine's own message, whole (docker's ``explanation``: the reason, without the request URL)."""
    explanation = getattr(exc, "explanation", None)
    text = (explanation if isinstance(explanation, str) and explanation.strip() else str(exc)).strip()
    return " ".join(text.split()) if text else type(exc).__name__


def _build_log_tail(exc: BaseException) -> str:
    lines: list[str] = []
    for entry in getattr(exc, "build_log", None) or []:
        if isinstance(entry, dict) and entry.get("stream"):
            lines.append(str(entry["stream"]).rstrip())
    return ("\n".join(lines[-8:]) + "\n" if lines else "") + _first_line(exc)
