"""The two wings meet only at the output folder's contract: the control plane never loads the
pipeline, and only `contract` spells the output folder's names. Which module may import which is
import-linter's (the contracts in operator/pyproject.toml, run by scripts/check); these tests hold
what it cannot see: what a process loads at run time, what the images install, which names are spelled
where."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "operator" / "laion_operator"
PYPROJECT = tomllib.loads((ROOT / "operator" / "pyproject.toml").read_text())
CONTRACTS = {c["name"]: c for c in PYPROJECT["tool"]["importlinter"]["contracts"]}
# The third-party packages the control plane's sources may not import, loaded here at run time.
PIPELINE_ONLY = set(CONTRACTS["The control plane loads no pipeline package"]["forbidden_modules"])


def loaded_after_import(module: str) -> set[str]:
    code = f"import json, sys; import {module}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT / "operator"), "PATH": "/usr/bin:/bin"},
    )
    return set(json.loads(out.stdout))


def test_the_operators_entry_module_loads_no_pipeline_package():
    loaded = loaded_after_import("laion_operator.control.controller")
    top = {m.split(".")[0] for m in loaded}
    assert "kopf" in top  # the import did happen
    assert not top & PIPELINE_ONLY, sorted(top & PIPELINE_ONLY)
    assert not {m for m in loaded if m.startswith(("laion_operator.pipeline", "laion_operator.testbed"))}


def test_the_cli_loads_the_pipeline_only_for_commands_that_run_it():
    assert not {m.split(".")[0] for m in loaded_after_import("laion_operator.cli")} & PIPELINE_ONLY


def test_every_module_of_the_package_has_a_layer():
    """A module the layers contract does not name is free to import anything, and to be imported by all."""
    layered = {
        name.strip()
        for contract in CONTRACTS.values()
        if contract["type"] == "layers" and contract["containers"] == ["laion_operator"]
        for layer in contract["layers"]
        for name in re.split(r"[|:]", layer)
    }
    modules = {
        p.stem if p.is_file() else p.name
        for p in PACKAGE.iterdir()
        if (p.suffix == ".py" and p.name != "__init__.py") or (p / "__init__.py").is_file()
    }
    assert modules == layered, (sorted(modules - layered), sorted(layered - modules))


def test_the_package_holds_no_test_bed_of_the_tests_or_benchmarks():
    """`testbed/` is the demo's loopback internet: each of its modules is one the demo command loads.
    The servers only the tests and bench/ use (the many-host internet, DNS, TLS, tiny models, the
    rarer failures) live in tests/support/."""
    testbed = PACKAGE / "testbed"
    imports = {
        path.stem: {
            (node.module or "").lstrip(".").split(".")[-1]
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.ImportFrom) and node.level == 1
        }
        for path in testbed.glob("*.py")
        if path.name != "__init__.py"
    }
    reached, todo = set(), ["demo"]
    while todo:
        module = todo.pop()
        if module in imports and module not in reached:
            reached.add(module)
            todo.extend(imports[module])
    assert reached == set(imports), sorted(set(imports) - reached)
    cli = (PACKAGE / "cli.py").read_text()
    assert "from .testbed.demo import" in cli  # the demo command is where the walk starts


def test_the_operator_image_installs_no_pipeline_package():
    project = PYPROJECT["project"]
    names = {
        re.split(r"[\[<>=; ]", d)[0].lower()
        for d in project["dependencies"] + project["optional-dependencies"]["operator"]
    }
    assert names.isdisjoint({"ray", "pyarrow", "pandas", "img2dataset", "opencv-python-headless", "numpy", "torch"}), (
        names
    )
    dockerfile = (ROOT / "images" / "operator" / "Dockerfile").read_text()
    assert "['optional-dependencies']['operator']" in dockerfile
    assert "pipeline" not in re.sub(r"#.*", "", dockerfile)


def test_only_the_contract_spells_the_output_folders_names():
    # String literals that build a name (prose in docstrings and messages may mention them).
    names = re.compile(r"""["'](_laion\b|[^"'\s]*_stats\.json|[^"'\s]*progress\.json|[^"'\s]*filter\.json|part_\{)""")
    offenders = []
    contract = PACKAGE / "contract"
    for path in PACKAGE.rglob("*.py"):
        if path.is_relative_to(contract):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if names.search(line) and not line.lstrip().startswith("#"):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []


def test_exit_codes_and_phases_are_spelled_once():
    offenders = []
    # A phase compared or assigned as a bare string (event and condition reasons may share the word).
    phase_literal = re.compile(
        r"""phase\W{1,5}["'](Pending|Queued|Filtering|Downloading|Annotating|Succeeded|Failed|"""
        r"""Stopping)["']"""
    )
    for path in PACKAGE.rglob("*.py"):
        if path.is_relative_to(PACKAGE / "contract"):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"INPUT_ERROR|EXIT\s*=\s*2|return 2\b", line) or phase_literal.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []


def test_a_ray_worker_loads_the_pipeline_without_img2datasets_cli_or_torch(ray_driver):
    """Every Ray worker of a part pays these imports: torch (through webdataset) and img2dataset's CLI
    (wandb, fire) took most of 11 s a process on a busy node."""
    # A driver of its own, so a fresh worker process, not one that ran other tests' tasks. (A task's
    # own runtime env would give one too, but Ray would unpack this driver's working_dir again over
    # the folder its other workers run in.)
    probe = (
        "import sys, json, ray\n"
        "from laion_operator.pipeline.runtime import ensure_ray\n"
        "def loaded_packages():\n"
        "    import importlib, sys\n"
        "    for stage in ('driver', 'download', 'convert', 'verify'):\n"
        "        importlib.import_module(f'laion_operator.pipeline.{stage}')\n"
        "    return sorted({m.split('.')[0] for m in sys.modules})\n"
        "ensure_ray(sys.argv[1])\n"
        "print(json.dumps(ray.get(ray.remote(loaded_packages).remote(), timeout=300)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, ray_driver.address], capture_output=True, text=True, timeout=420, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = set(json.loads(done.stdout.splitlines()[-1]))
    assert {"img2dataset", "webdataset", "cv2", "pyarrow"} <= loaded  # the imports did happen
    assert not loaded & {"torch", "wandb", "fire", "pyspark"}, sorted(loaded)


def test_the_job_driver_loads_the_pipeline_light_and_other_processes_whole():
    light = (
        "from laion_operator.pipeline import load_light; load_light(); "
        "import laion_operator.pipeline.driver, laion_operator.pipeline.download, torch; "
        "from img2dataset import writer; import webdataset.pytorch as p; "
        "print(int(torch.ones(2).sum()), writer.WebDatasetSampleWriter.__name__, "
        "p.IterableDataset is torch.utils.data.IterableDataset)"
    )
    whole = (
        "import laion_operator.pipeline.download, torch, img2dataset; import webdataset.pytorch as p; "
        "print(p.IterableDataset is torch.utils.data.IterableDataset, callable(img2dataset.download))"
    )
    outputs = [
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
            env={"PYTHONPATH": str(ROOT / "operator"), "PATH": "/usr/bin:/bin"},
        ).stdout.split()
        for code in (light, whole)
    ]
    # torch is still there for the stages that use it; webdataset then lacks only its DataLoader glue
    assert outputs[0] == ["2", "WebDatasetSampleWriter", "False"]
    # a process that is not the pipeline's alone (a notebook, the tests) keeps both libraries whole
    assert outputs[1] == ["True", "True"]


def test_the_cli_loads_the_pipeline_light_for_a_part_and_whole_when_called_in_process(tmp_path):
    """`laion-operator run` imports the pipeline before it starts Ray: img2dataset's CLI and torch were
    3 s of a part's start there. `cli.main` called from a notebook keeps the libraries whole."""
    part = tmp_path / "part.yaml"
    part.write_text(yaml.safe_dump({"partId": "1", "source": {"urls": ["m.parquet"]}, "output": {"uri": "out"}}))
    outputs = []
    for call in ("script", "main"):
        code = (
            f"import sys; sys.argv = ['laion-operator', 'run', '--dry-run', {str(part)!r}]; "
            f"from laion_operator import cli; rc = cli.{call}(); import laion_operator.pipeline.driver; "
            "print(rc, 'torch' in sys.modules, 'img2dataset.main' in sys.modules)"
        )
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
        outputs.append(done.stdout.split()[-3:])
    # --dry-run fails on the absent metadata (2: bad input); what matters is what the process loaded
    assert outputs[0][1:] == ["False", "False"], outputs
    assert outputs[1][1:] == ["True", "True"], outputs


def test_importing_the_pipeline_after_ray_starts_no_ray():
    """The pipeline asks whether it is in a Ray worker when imported; asked the wrong way, Ray's
    auto-init started a private local Ray there, and a driver about to join a cluster
    (`ensure_ray(address)`) then stayed on that one."""
    code = "import ray, laion_operator.pipeline; print(ray.is_initialized())"
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT / "operator"), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-1] == "False"


def test_no_module_of_the_package_is_over_its_size():
    """A module over 500 lines (400 in the control plane, whose modules each hold one idea of a part's
    life) holds more than one idea: split it along them rather than raise the bound."""
    over = []
    for path in PACKAGE.rglob("*.py"):
        bound = 400 if "control" in path.relative_to(PACKAGE).parts else 500
        lines = len(path.read_text().splitlines())
        if lines > bound:
            over.append(f"{path.relative_to(ROOT)}: {lines} lines (at most {bound})")
    assert over == []
