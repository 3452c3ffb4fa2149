"""Experiment trackers for ``tracegen distill``: the metrics.jsonl scalars, also sent where users look.

``distill.report_to`` names any of TensorBoard, Weights & Biases, Trackio and MLflow; they are driven
through accelerate's trackers (``Accelerator(log_with=..., project_dir=...)``, ``init_trackers``,
``log``). Each optimizer step sends the numbers of its metrics.jsonl line under the same names, with
the line's ``step`` as the step; the run config is the distill settings (flattened to
``section.name`` keys, the shape every tracker takes). Nothing here reads the environment's secrets,
and the settings hold none, so no key reaches a tracker's config.

Where the runs go, without a network unless the user asks for one:

- tensorboard: ``OUT/runs/tracegen-distill/`` (event files; ``tensorboard --logdir OUT/runs``).
- wandb: ``OUT/runs/wandb/``, offline (``wandb sync`` uploads later) unless ``WANDB_MODE`` is set.
- trackio: trackio's own local store (it is local unless told of a Space).
- mlflow: a SQLite store ``OUT/runs/mlflow.db`` (MLflow 3.13+ refuses a plain folder store), artifacts
  in ``OUT/runs/mlruns``, unless ``MLFLOW_TRACKING_URI`` is set.

A tracker whose package is missing is refused when this object is built, before any model loads
(accelerate itself would drop it silently). The trackers start at the first logged step, so a run
refused for bad input leaves no tracker run behind. Not guaranteed: a resumed run is a new run for
wandb, trackio and mlflow (TensorBoard adds an event file to the same folder), and steps after the
checkpoint that a crashed run had already logged are logged again.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from tracegen.config import DistillConfig
from tracegen.errors import BadInputError

PROJECT = "tracegen-distill"
FOLDER = "runs"
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio", "mlflow": "mlflow"}
"""Tracker name -> the package (import name = pip name) it needs."""


class Tracking:
    """The trackers of one distill run: built from the settings and the output folder (process 0 logs)."""

    def __init__(self, config: DistillConfig, out: Path) -> None:
        self.names = list(config.report_to)
        for name in self.names:
            package = PACKAGES[name]
            if importlib.util.find_spec(package) is None:
                raise BadInputError(
                    f"distill.report_to: {name} needs the {package} package, which is not installed",
                    hint=f"pip install {package} (or pip install 'tracegen[track]'), or drop {name} from report_to",
                )
        self.folder = out / FOLDER
        self._run_name = out.resolve().name
        self._config = run_config(config)
        self._accelerator: Any = None
        self._started = False

    def accelerator_kwargs(self) -> dict[str, Any]:
        """What ``Accelerator(...)`` needs to drive the trackers (nothing when none is asked for)."""
        return {"log_with": self.names, "project_dir": str(self.folder)} if self.names else {}

    def attach(self, accelerator: Any) -> None:
        """The accelerator built with :meth:`accelerator_kwargs`, whose trackers :meth:`log` feeds."""
        dropped = [name for name in self.names if name not in {str(t) for t in accelerator.log_with}]
        if dropped:  # accelerate found the package unusable (its own check) and left it out without a word
            raise BadInputError(
                f"distill.report_to: accelerate cannot use {dropped[0]} here",
                hint=f"pip install --upgrade {PACKAGES[dropped[0]]}, or drop {dropped[0]} from report_to",
            )
        self._accelerator = accelerator

    def log(self, step: int, scalars: dict[str, Any]) -> None:
        """Send the numbers of ``scalars`` (a metrics.jsonl line) at ``step``; ``step`` and Nones left out."""
        if not self.names:
            return
        if not self._started:
            self._start()
        values = {
            k: v for k, v in scalars.items() if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)
        }
        self._accelerator.log(values, step=step)

    def close(self) -> None:
        """Finish every started tracker (flushes event files, closes the wandb/trackio/mlflow run).

        Not ``accelerator.end_training()``: that also destroys the process group, which is the
        trainer's to keep or end, not the trackers'.
        """
        if not self._started:
            return
        for tracker in self._accelerator.trackers:
            tracker.finish()
        self._started = False

    def _start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        init_kwargs: dict[str, dict[str, Any]] = {
            "wandb": {"name": self._run_name, "dir": str(self.folder)},
            "trackio": {"name": self._run_name},
            "mlflow": {"run_name": self._run_name, "logging_dir": (self.folder / "mlruns").resolve().as_uri()},
        }
        if "WANDB_MODE" not in os.environ:  # the user's choice wins; the default needs no network
            init_kwargs["wandb"]["mode"] = "offline"
        if "mlflow" in self.names and "MLFLOW_TRACKING_URI" not in os.environ:
            import mlflow

            mlflow.set_tracking_uri(f"sqlite:///{(self.folder / 'mlflow.db').resolve()}")
        self._accelerator.init_trackers(
            PROJECT, config=self._config, init_kwargs={k: v for k, v in init_kwargs.items() if k in self.names}
        )
        self._started = True


def run_config(config: DistillConfig) -> dict[str, Any]:
    """The distill settings as ``section.name`` keys with scalar values (TensorBoard's hparams refuse
    nested ones; lists become JSON text, Nones stay and TensorBoard skips them)."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
        elif isinstance(value, list):
            flat[prefix] = json.dumps(value)
        else:
            flat[prefix] = value

    walk("", config.model_dump(mode="json"))
    return flat
