"""Helpers shared by the Triton kernel test modules (not a test module).

* :func:`prepare` -- call at the top of a kernel test module, before it imports Triton or a kernel: without a
  GPU it sets TRITON_INTERPRET=1, and it says whether that came too late. triton.language's own helpers
  (tl.sum, tl.zeros, ...) are @jit functions created when triton.language is first imported; if another test
  module collected first imported it without TRITON_INTERPRET=1, they cannot run inside the interpreter, and
  the module's tests must run again in a fresh process (:func:`run_in_fresh_process`).
* :func:`in_process_mark` -- after the kernel module is imported: the skip mark for the tests that must run in
  this process, and the module-level skip when the kernels were imported compiled on a machine without a GPU.
* :func:`run_compiled` -- run Python code in a subprocess without TRITON_INTERPRET (the real compiler: the
  ahead-of-time ``compile_check`` tests), since this process imported the kernels for the interpreter.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch


def prepare() -> bool:
    """Set TRITON_INTERPRET=1 when there is no GPU; True when triton.language was imported before that."""
    late = not torch.cuda.is_available() and (
        ("triton.language" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1")
        or os.environ.get("ZOO_TRITON_IMPORTED_EARLY") == "1"  # seen by tests/conftest.py, which set the variable
    )
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    return late


def in_process_mark(late: bool, kernel_module, fresh_test: str):
    """``late`` from :func:`prepare`; ``kernel_module`` the imported kernel module (its INTERPRET flag);
    ``fresh_test`` the module's test that re-runs it in a fresh process. Skips the whole module when the kernels
    were imported compiled without a GPU to run them, else returns the mark for the in-process tests."""
    if not torch.cuda.is_available() and not kernel_module.INTERPRET and not late:
        pytest.skip(f"{kernel_module.__name__} was imported without TRITON_INTERPRET=1", allow_module_level=True)
    return pytest.mark.skipif(late, reason=f"triton.language was imported before TRITON_INTERPRET=1: see {fresh_test}")


def run_in_fresh_process(test_file: str) -> None:
    """pytest on ``test_file`` in a new interpreter with TRITON_INTERPRET=1; fails with its output."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop("ZOO_TRITON_IMPORTED_EARLY", None)
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                             test_file], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def run_compiled(code: str, timeout: int = 600) -> None:
    """``python -c code`` without TRITON_INTERPRET; fails with its stderr."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]


class LaunchGuardRecorder:
    """Stands in for ``zoo.kernels._compile.on_device_of`` (monkeypatched into a kernel module): records the devices
    the guard is entered with (``entered``) and, for each launch of a kernel wrapped by :meth:`checked` (or noted
    with :meth:`note_launch`), whether it ran inside the guard (``launches``)."""

    def __init__(self):
        self.entered: list = []
        self.launches: list[bool] = []
        self._depth = 0

    def __call__(self, tensor):  # on_device_of(tensor)
        self.entered.append(tensor.device)
        return self

    def __enter__(self):
        self._depth += 1

    def __exit__(self, *exc):
        self._depth -= 1
        return False

    def note_launch(self) -> None:
        self.launches.append(self._depth > 0)

    def checked(self, kernel):
        """``kernel`` (a Triton kernel, launched as ``kernel[grid](...)``) noting each launch."""
        recorder = self

        class Checked:
            def __getitem__(self, grid):
                launch = kernel[grid]

                def run(*args, **kwargs):
                    recorder.note_launch()
                    return launch(*args, **kwargs)
                return run
        return Checked()


def check_single_config_variable(module: str, kernels: tuple[str, ...], tuned_counts: list[int]) -> None:
    """``ZOO_TRITON_SINGLE_CONFIG=1`` gives each of ``kernels`` (autotuned kernels of ``zoo.kernels.<module>``) one
    config, one of its tuned list (``tuned_counts`` configs when unset). Checked in a subprocess importing the module
    without TRITON_INTERPRET (where it always has one config): its autotuners are built at import."""
    code = (
        "import importlib, os\n"
        "os.environ.pop('ZOO_TRITON_SINGLE_CONFIG', None)\n"
        f"from zoo.kernels import {module} as m\n"
        f"kernels = lambda m: [getattr(m, name) for name in {list(kernels)!r}]\n"
        "tuned = [[c.all_kwargs() for c in k.configs] for k in kernels(m)]\n"
        "os.environ['ZOO_TRITON_SINGLE_CONFIG'] = '1'\n"
        "single = [[c.all_kwargs() for c in k.configs] for k in kernels(importlib.reload(m))]\n"
        f"assert [len(c) for c in tuned] == {tuned_counts!r} and all(len(c) == 1 for c in single), (tuned, single)\n"
        "assert all(s[0] in t for s, t in zip(single, tuned)), single  # one of the configs compile_check compiles\n"
    )
    run_compiled(code)
