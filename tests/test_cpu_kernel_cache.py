"""The kernel build cache: built once, loaded as-is from any environment (a Ray worker's PATH and variables),
never blocked by a builder that was killed, and concurrent loaders build once between them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from model import cpu_kernels as ck

# A tiny extension (no torch headers: it compiles in about a second) for the lock tests, which build for real.
TINY_SOURCE = """
#include <Python.h>
#define CAT2(a, b) a##b
#define CAT(a, b) CAT2(a, b)
#define STR2(a) #a
#define STR(a) STR2(a)
static PyObject* answer(PyObject*, PyObject*) { return PyLong_FromLong(42); }
static PyMethodDef methods[] = {{"answer", answer, METH_NOARGS, ""}, {nullptr, nullptr, 0, nullptr}};
static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, STR(TORCH_EXTENSION_NAME), nullptr, -1, methods};
PyMODINIT_FUNC CAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&module_def); }
"""

LOAD_TINY = """
import json, sys
from pathlib import Path
from model import cpu_kernels
m = cpu_kernels.load_extension("tiny", [Path(sys.argv[1])], [], [], cache=Path(sys.argv[2]))
print(json.dumps({"answer": m.answer(), "builds": cpu_kernels.builds, "file": m.__file__}))
"""

HOLD_LOCK = """
import sys, time
from pathlib import Path
from model.cpu_kernels import build_lock
with build_lock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(600)
"""


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()}


def run_python(code: str, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout=300):
    return subprocess.run(
        [sys.executable, "-c", code, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def ray_worker_like_env(tmp_path: Path) -> dict[str, str]:
    """Another PATH order, a broken compiler, other working directory, variables like a Ray worker's."""
    path = os.environ.get("PATH", "").split(os.pathsep)
    return {
        **os.environ,
        "PATH": os.pathsep.join([str(tmp_path), *reversed(path)]),
        "CXX": "/bin/false",  # a build would fail: loading must not need one
        "CC": "/bin/false",
        "RAY_RAYLET_PID": "1",
        "RAY_JOB_ID": "01000000",
        "OMP_NUM_THREADS": "1",
    }


def test_another_environment_reuses_the_build_without_compiling(cpu_kernels, tmp_path):
    target = ck.kernel_cache_dir() / f"specserve_cpu_kernels_{ck.build_key(ck.SOURCES, ck.CFLAGS, ck.LDFLAGS)}.so"
    assert target.exists()
    before = snapshot(target.parent)
    code = "import json; from model import cpu_kernels as k; m = k.load_kernels(); "
    code += "print(json.dumps({'file': m.__file__, 'builds': k.builds, 'ops': hasattr(m, 'paged_attention')}))"
    out = run_python(code, env=ray_worker_like_env(tmp_path), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"file": str(target), "builds": 0, "ops": True}
    assert snapshot(target.parent) == before  # nothing rebuilt, renamed or left behind


@pytest.fixture()
def tiny(tmp_path) -> tuple[Path, Path]:
    source = tmp_path / "tiny.cpp"
    source.write_text(TINY_SOURCE)
    return source, tmp_path / "cache"


def test_builds_once_then_imports(tiny):
    source, cache = tiny
    first = run_python(LOAD_TINY, str(source), str(cache))
    second = run_python(LOAD_TINY, str(source), str(cache))
    assert first.returncode == 0 and second.returncode == 0, first.stderr[-2000:] + second.stderr[-2000:]
    a, b = (json.loads(p.stdout.strip().splitlines()[-1]) for p in (first, second))
    assert (a["answer"], a["builds"], b["answer"], b["builds"]) == (42, 1, 42, 0)
    assert Path(b["file"]).parent == cache
    assert sorted(p.name for p in cache.iterdir()) == sorted([ck.LOCK_FILE, Path(b["file"]).name])


def test_a_killed_builder_leaves_nothing_that_blocks(tiny):
    source, cache = tiny
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(cache)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    abandoned = cache / f"{ck.BUILD_PREFIX}tiny-dead"  # what a builder killed mid-build leaves
    abandoned.mkdir()
    (abandoned / "lock").write_text("")  # torch's own lock file, which used to block every later load
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    out = run_python(LOAD_TINY, str(source), str(cache), timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["answer"] == 42
    assert not abandoned.exists()


def test_concurrent_loaders_wait_and_build_once(tiny):
    source, cache = tiny
    with ck.build_lock(cache):  # both loaders find no build and queue behind the lock
        loaders = [
            subprocess.Popen(
                [sys.executable, "-c", LOAD_TINY, str(source), str(cache)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        time.sleep(3)
        assert [p.poll() for p in loaders] == [None, None]
    results = []
    for p in loaders:
        stdout, stderr = p.communicate(timeout=180)
        assert p.returncode == 0, stderr[-2000:]
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    assert sorted(r["builds"] for r in results) == [0, 1]
    assert {r["answer"] for r in results} == {42}
