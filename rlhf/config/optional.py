"""Packages a config may ask for that a plain install lacks (the experiment trackers), checked at
`rlhf validate` and again when the run opens them (rlhf/production/trackers.py)."""

from __future__ import annotations

import importlib.util

TRACKER_PACKAGES = {
    "wandb": ("wandb", "pip install wandb"),
    "tensorboard": ("tensorboardX", "pip install tensorboardX"),
    "mlflow": ("mlflow", "pip install 'rlhf[mlflow]' (or mlflow-skinny)"),
}


def missing_package(name: str) -> str | None:
    """One line when the package tracker `name` needs is not installed, else None."""
    module, install = TRACKER_PACKAGES[name]
    if importlib.util.find_spec(module) is None:
        return f"needs the {module} package, which is not installed: {install}"
    return None
