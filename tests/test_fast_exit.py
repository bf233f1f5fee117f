"""Sweep jobs that are processes of their own freeze their heap at exit (phf/fast_exit.py).
tests/test_slurm.py runs them for real."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from phf.config import CONF_DIR, register_schemas
from phf.fast_exit import FastExitCallback


@pytest.mark.parametrize(
    ("hardware", "launcher"),
    [("slurm", "SlurmLauncher"), ("local_gpus", "LocalLauncher"), ("cpu", None)],
)
def test_hardware_with_a_process_per_job_registers_the_callback(
    hardware: str, launcher: str | None
) -> None:
    register_schemas()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            config_name="config", overrides=[f"hardware={hardware}"], return_hydra_config=True
        )
    callbacks = cfg.hydra.callbacks
    assert "sweep" in callbacks  # conf/config.yaml's own callback is kept
    if launcher is None:  # the basic launcher runs jobs in its own process: nothing to do
        assert "fast_exit" not in callbacks
        return
    assert isinstance(instantiate(callbacks.fast_exit), FastExitCallback)
    assert cfg.hydra.launcher._target_.endswith(f"submitit_launcher.{launcher}")


def test_the_heap_is_frozen_at_exit_after_later_handlers_and_before_earlier_ones() -> None:
    code = (
        "import atexit, gc\n"
        "atexit.register(lambda: print('earlier', gc.get_freeze_count() > 0))\n"
        "from phf.fast_exit import FastExitCallback\n"
        "FastExitCallback().on_job_start(config=None, task_function=None)\n"
        "atexit.register(lambda: print('later', gc.get_freeze_count() > 0))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n") == ["later False", "earlier True", ""]
