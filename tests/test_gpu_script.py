"""tests/run_gpu_kernels.sh, the one-shot check run on a lent GPU machine, driven on CPU: a stub interpreter
records each command it is asked to run and a stub nvidia-smi stands in for the GPU, so the script's own shell
logic (variables under ``set -u``, the QUICK / FULL / GRAPH switches, the exit status) is checked before any GPU
time is spent on it. The commands themselves are covered by the kernel and benchmark tests."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "run_gpu_kernels.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _stub(path: Path, body: str) -> None:
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def run_script(tmp_path: Path, fail_on: str = "", gpu: bool = True, **switches: str) -> tuple[int, list[str], str]:
    """Run the script with stubs; returns (exit code, the interpreter's argument lines, output)."""
    log = tmp_path / "calls.log"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    gpu_lines = 'echo "name, driver_version, memory.total"; echo "Stub GPU, 0, 0 MiB"\n'
    _stub(bin_dir / "nvidia-smi", gpu_lines if gpu else "exit 9\n")
    # Every interpreter call is logged (and, in a second log, the ZOO_TRITON_SINGLE_CONFIG it saw); the one whose
    # arguments contain FAIL_ON fails.
    _stub(bin_dir / "stub-python", f'echo "$*" >> {log}\n'
          f'echo "${{ZOO_TRITON_SINGLE_CONFIG:-unset}} $*" >> {log.with_name("single_config.log")}\n'
          'if [ -n "${FAIL_ON:-}" ] && [[ "$*" == *"$FAIL_ON"* ]]; then exit 1; fi\nexit 0\n')
    env = {k: v for k, v in os.environ.items()
           if k not in ("QUICK", "FULL", "GRAPH", "ZOO_SHADOW", "ZOO_TRITON_SINGLE_CONFIG")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", PY=str(bin_dir / "stub-python"),
               FAIL_ON=fail_on, TMPDIR=str(tmp_path))
    env.update(switches)
    done = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    calls = log.read_text().splitlines() if log.exists() else []
    return done.returncode, calls, done.stdout + done.stderr


# step 4's kernel tests: the graph kernels, attend() over Edges, the flash kernel's EDGE slot, the kernel paths compiled
GRAPH_TESTS = ("-m pytest -q -p no:cacheprovider tests/test_graph_kernel.py tests/test_vector_kernel.py "
               "tests/test_edges_mask.py tests/test_kernel_edges.py tests/test_graph_kernel_fullgraph.py")


def test_default_run_reaches_every_default_step(tmp_path):
    code, calls, output = run_script(tmp_path)
    assert code == 0, output
    assert "unbound variable" not in output
    steps = [line for line in calls if not line.startswith("-c ")]
    assert steps[0] == "-m zoo.bench.attention --gpu --quick"
    assert steps[1].startswith("-m pytest -q -p no:cacheprovider -m gpu tests/test_kernels_flash.py")
    assert "not speed" in steps[1]
    assert steps[2] == GRAPH_TESTS
    assert steps[3].startswith("-m zoo.bench.graph --device cuda")
    assert len(steps) == 4
    assert "== done (status 0)" in output


def test_kernel_tests_run_with_one_autotune_config_and_the_benchmarks_autotuned(tmp_path):
    """ZOO_TRITON_SINGLE_CONFIG=1 bounds the compile time of the correctness steps: the gpu-marked attention tests
    (step 2) and the graph kernels' tests (step 4: 18 GATv2 configs, 16 + 12 vector-attention configs otherwise);
    the benchmarks (steps 1 and 4) keep the autotuned kernels."""
    code, _, output = run_script(tmp_path)
    assert code == 0, output
    seen = dict(line.split(" ", 1)[::-1] for line in (tmp_path / "single_config.log").read_text().splitlines()
                if not line.split(" ", 1)[1].startswith("-c "))
    assert seen[GRAPH_TESTS] == "1"
    assert next(v for k, v in seen.items() if "-m gpu tests/test_kernels_flash.py" in k) == "1"
    assert next(v for k, v in seen.items() if k.startswith("-m zoo.bench.graph")) == "unset"
    assert next(v for k, v in seen.items() if k.startswith("-m zoo.bench.attention")) == "unset"


def test_switches_select_the_steps(tmp_path):
    code, calls, output = run_script(tmp_path, QUICK="0", FULL="1", GRAPH="0")
    assert code == 0, output
    steps = [line for line in calls if not line.startswith("-c ")]
    assert steps[0] == "-m zoo.bench.attention --gpu"  # the full benchmark
    assert any("-k speed" in line for line in steps) and any("tests/test_radial.py" in line for line in steps)
    assert not any("zoo.bench.graph" in line or "test_vector_kernel" in line for line in steps)


def test_a_failing_step_does_not_stop_the_later_ones_but_sets_the_status(tmp_path):
    code, calls, output = run_script(tmp_path, fail_on="zoo.bench.attention --gpu")
    assert code == 1, output
    assert any("zoo.bench.graph" in line for line in calls)
    assert "== done (status 1)" in output


def test_no_gpu_stops_before_any_step(tmp_path):
    code, calls, output = run_script(tmp_path, gpu=False)
    assert code == 2 and "no nvidia-smi / GPU" in output
    assert not any(line.startswith("-m ") for line in calls)


def test_shadow_tree_for_a_bare_image_is_laid_out_and_removed(tmp_path):
    """ZOO_SHADOW=1 (what happens when zoo does not import): the link tree maps tasks/, kernels/, configs/ and
    checkpoints/ under zoo/ as the installed package does, goes first on PYTHONPATH, and is gone afterwards."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    seen = tmp_path / "seen.txt"
    _stub(bin_dir / "probe-python",
          f'if [ ! -s {seen} ]; then first="${{PYTHONPATH%%:*}}"; ls "$first/zoo" > {seen}; fi\nexit 0\n')
    code, _, output = run_script(tmp_path, ZOO_SHADOW="1", PY=str(bin_dir / "probe-python"))
    assert code == 0, output
    listed = set(seen.read_text().split())
    assert {"tasks", "kernels", "configs", "checkpoints", "attention", "__init__.py"} <= listed
    assert not list(tmp_path.glob("zoo_shadow_*"))
