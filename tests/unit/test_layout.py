"""The package layout the code promises (ARCHITECTURE.md):

* imports point one way: benchmarks -> launch -> distributed -> data_prep; ``data_prep`` is the
  ground floor (config, log, file helpers, the pure-data backbone registry) and imports none of the other three;
* ``launch`` imports only the pure ``distributed.tuning`` (planner), ``distributed.rundir`` (the run
  directory's files) and ``distributed.results`` (metrics.json's records), never TensorFlow, Horovod,
  mpi4py or numpy, so the launcher starts in a fraction of a second on a login node;
* no product package imports ``benchmarks``, and no module imports itself through a circle;
* benchmark worker modules load neither TensorFlow nor numpy at import time: thread tuning must
  set its variables first.

The graph is read from the source with ``ast`` (every import, including those inside functions).
"""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("data_prep", "distributed", "launch", "benchmarks")
PRODUCT = ("data_prep", "distributed", "launch")
HEAVY = ("tensorflow", "keras", "horovod", "mpi4py", "numpy")
PURE = ("distributed.tuning", "distributed.rundir", "distributed.results")  # no TF/numpy: launch may import them


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    # one level of subpackages too (data_prep/datasets/): their imports obey the same rules
    return {_module_name(p): p for pkg in PACKAGES
            for p in sorted([*(ROOT / pkg).glob("*.py"), *(ROOT / pkg).glob("*/*.py")])}


def _imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``name`` imports anywhere in its file (a package's ``from pkg import mod``
    counts as the module ``pkg.mod``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # import a.b.c of a known module a.b
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = _modules()
    assert {"data_prep.config", "distributed.tuning", "launch.commands", "benchmarks.scaling",
            "data_prep.datasets", "data_prep.datasets.chexpert"} <= set(mods)
    return {name: _imported(name, path, set(mods)) for name, path in mods.items()}


def _top(module: str) -> str:
    return module.split(".")[0]


def test_the_graph_reader_sees_function_level_and_relative_imports(tmp_path):
    src = tmp_path / "pkg" / "mod.py"
    src.parent.mkdir()
    src.write_text("from . import other\nimport pkg.deep.x\ndef f():\n    from pkg.util import helper\n")
    known = {"pkg.mod", "pkg.other", "pkg.util", "pkg.deep"}
    assert _imported("pkg.mod", src, known) == {"pkg.other", "pkg.util", "pkg.deep"}


def test_no_import_circle(graph):
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    stack: list[str] = []

    def visit(m: str):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                circle = stack[stack.index(n):] + [n]
                pytest.fail("import circle: " + " -> ".join(circle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_product_code_never_imports_benchmarks(graph):
    bad = sorted(f"{m} -> {n}" for m, deps in graph.items() if _top(m) in PRODUCT
                 for n in deps if _top(n) == "benchmarks")
    assert bad == []


def test_layers_point_down(graph):
    allowed = {
        "data_prep": lambda n: _top(n) == "data_prep",
        "distributed": lambda n: _top(n) in ("data_prep", "distributed"),
        "launch": lambda n: _top(n) in ("data_prep", "launch") or n in PURE,
        "benchmarks": lambda n: True,
    }
    bad = sorted(f"{m} -> {n}" for m, deps in graph.items() for n in deps if not allowed[_top(m)](n))
    assert bad == [], "imports against the layering (data_prep <- distributed <- launch <- benchmarks; " \
                      f"launch uses only {', '.join(PURE)}): " + ", ".join(bad)


def _loaded_after(code: str, cwd: Path = ROOT) -> dict:
    """Run ``code`` in a fresh interpreter with this checkout first on the path; returns its
    exit code, output and which of HEAVY it had loaded at the end."""
    probe = ("import sys, json\nrc = 0\ntry:\n" + "".join(f"    {line}\n" for line in code.splitlines())
             + "except SystemExit as e:\n    rc = e.code or 0\n"
             + "print('\\n' + json.dumps({'rc': rc, 'heavy': sorted({m.split('.')[0] for m in sys.modules} "
             + f"& set({HEAVY!r}))}}))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    r = subprocess.run([sys.executable, "-c", probe], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    result["stdout"] = r.stdout
    return result


def test_launch_help_loads_no_tensorflow_horovod_mpi4py_or_numpy():
    r = _loaded_after("import runpy\nsys.argv = ['launch', '--help']\nrunpy.run_module('launch', run_name='__main__')")
    assert r["rc"] == 0 and "usage: cxr-launch" in r["stdout"]
    assert r["heavy"] == []


def test_a_pipeline_dry_run_loads_none_of_them_either(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: {{csv: {tmp_path}/Data_Entry_2017.csv, images: {tmp_path}, image_size: 32}}\n"
                   f"prep: {{out: {tmp_path}/prepared}}\nrun: {{dir: {tmp_path}/run}}\n")
    r = _loaded_after(f"from launch.__main__ import main\nrc = main(['pipeline', '--config', {str(cfg)!r}, "
                      f"'--np', '1', '--dry-run'])")
    assert r["rc"] == 0 and "-m data_prep" in r["stdout"] and "-m distributed.evaluate" in r["stdout"]
    assert r["heavy"] == []  # the stage hashes and skip checks are plain Python


def test_benchmark_worker_modules_load_no_tensorflow_or_numpy_at_import():
    r = _loaded_after("import benchmarks.epoch_timing, benchmarks.scaling, benchmarks.input_pipeline")
    assert r["heavy"] == []


# Files of the same name that are not a run directory's: the virtual cluster's own state, and the
# resolved-config writer's default, which data_prep (below distributed) cannot take from rundir.
NOT_RUN_DIR = {("launch/vslurm.py", "state.json"), ("launch/vcluster.py", "state.json"),
               ("data_prep/config.py", "config.yaml")}


def _docstrings(tree) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            out.add(id(body[0].value))
    return out


def test_run_directory_file_names_are_spelled_in_rundir_only():
    """Issue 35: one owner for the run directory. A string in product code (docstrings aside) that is a
    run-directory file name, or a path ending in one, is a second spelling of it."""
    from distributed import rundir

    names = {v.rsplit("/", 1)[-1] for k, v in vars(rundir).items()
             if k.isupper() and isinstance(v, str) and "." in v.rsplit("/", 1)[-1] and "*" not in v}
    assert {"state.json", "history.csv", "last.keras", "best.keras", "metrics.json"} <= names
    found = []
    for pkg in PRODUCT:
        for path in sorted((ROOT / pkg).glob("*.py")):
            rel = str(path.relative_to(ROOT))
            if rel == "distributed/rundir.py":
                continue
            tree = ast.parse(path.read_text())
            docs = _docstrings(tree)
            for node in ast.walk(tree):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
                    for n in names:
                        if (node.value == n or node.value.endswith("/" + n)) and (rel, n) not in NOT_RUN_DIR:
                            found.append(f"{rel}:{node.lineno} {node.value!r}")
    assert found == [], "run-directory file names outside distributed/rundir.py: " + ", ".join(found)


def test_test_hooks_are_read_in_testhooks_only():
    """Issue 35: test hooks in one module that product code calls through one seam. No other product
    module names a test hook's variable; unset, training has no test callback."""
    from data_prep import testhooks

    hooks = [v for k, v in vars(testhooks).items() if k.isupper() and isinstance(v, str) and v.startswith("CXR_")]
    assert len(hooks) == 5
    found = []
    for pkg in PRODUCT:
        for path in sorted((ROOT / pkg).glob("*.py")):
            if path.name == "testhooks.py":
                continue
            tree = ast.parse(path.read_text())
            docs = _docstrings(tree)
            found += [f"{path.relative_to(ROOT)}:{n.lineno}" for n in ast.walk(tree)
                      if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs
                      and any(h in n.value for h in hooks)]
    assert found == [], "test hook variables outside data_prep/testhooks.py: " + ", ".join(found)


def test_unset_hooks_do_nothing(monkeypatch):
    from data_prep import testhooks

    for name in ("CXR_STOP_AFTER", "CXR_STEP_SLEEP_S", "CXR_TEST_DUMP"):
        monkeypatch.delenv(name, raising=False)
    assert not testhooks.training_hooks("warmup") and testhooks.dump_dir() is None
    monkeypatch.setenv("CXR_STOP_AFTER", "finetune:2")
    assert testhooks.stop_after("finetune") == 2 and testhooks.stop_after("warmup") is None
    assert testhooks.training_hooks("finetune") and not testhooks.training_hooks("warmup")


def test_training_hook_sleeps_and_stops_after_every_rank_arrived(monkeypatch):
    from data_prep import testhooks

    monkeypatch.setenv("CXR_STOP_AFTER", "finetune:2")
    monkeypatch.setenv("CXR_STEP_SLEEP_S", "0.25")
    slept, calls = [], []
    monkeypatch.setattr(testhooks.time, "sleep", slept.append)
    monkeypatch.setattr(testhooks.os, "_exit", lambda code: calls.append(("exit", code)))
    hooks = testhooks.training_callback_functions("finetune", lambda: calls.append("barrier"))
    hooks["on_train_batch_end"](0, {})
    hooks["on_epoch_end"](0, {})  # the first epoch: nothing
    assert slept == [0.25] and calls == []
    hooks["on_epoch_end"](1, {})
    assert calls == ["barrier", ("exit", testhooks.STOP_EXIT_CODE)]  # the barrier first: rank 0 has committed
    calls.clear()
    testhooks.training_callback_functions("warmup", lambda: calls.append("barrier"))["on_epoch_end"](1, {})
    assert calls == []


def test_test_module_basenames_are_unique():
    """The test folders have no __init__.py, so pytest imports each module by its basename: two files of one
    name in tests/unit and tests/e2e make the second fail to collect ("import file mismatch")."""
    seen: dict[str, list[str]] = {}
    for p in sorted((ROOT / "tests").rglob("test_*.py")):
        seen.setdefault(p.name, []).append(str(p.relative_to(ROOT)))
    assert {k: v for k, v in seen.items() if len(v) > 1} == {}


def test_a_grid_sweep_dry_run_loads_none_of_them(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: {{csv: {tmp_path}/Data_Entry_2017.csv, images: {tmp_path}, image_size: 32}}\n"
                   f"prep: {{out: {tmp_path}/prepared}}\nrun: {{dir: {tmp_path}/run}}\nmodel: {{backbone: tiny}}\n")
    r = _loaded_after(f"from launch.__main__ import main\nrc = main(['sweep', '--config', {str(cfg)!r}, '--preset', "
                      f"'transfer-options', '--seeds', '0,1', '--np', '1', '--dry-run'])")
    assert r["rc"] == 0 and r["stdout"].count("-m distributed.evaluate") == 10  # 5 preset arms x 2 seeds
    assert r["heavy"] == []  # arms, names and prep sharing are plain Python; sweep.png is another process
