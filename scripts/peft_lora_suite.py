"""Run PEFT's own LoRA tests twice: with ``peft.LoraConfig``, then with ``peft_gp.GPLoraConfig`` swapped in.

PEFT's source distribution on PyPI ships its test suite. This script takes ``tests/test_custom_models.py`` (and the
helpers it imports) of the installed PEFT version, from its sdist (``pip download --no-deps --no-binary :all:
peft==<version>``, cached) or from a folder given with ``--tests``, keeps the LoRA cases (tests parametrized with
``LoraConfig``, or whose body builds one), and runs them:

* ``plain``: as PEFT ships them;
* ``gp``: with ``from peft_gp import GPLoraConfig as LoraConfig`` after the imports of ``test_custom_models.py`` and
  of the helpers it uses that import ``LoraConfig`` (``testing_common.py``, ``testing_utils.py``: their "is this
  LoRA?" checks, such as the skip of merging grouped convolutions or the name of the init argument, compare with
  ``LoraConfig`` by identity), and every GP adapter's projected groups resolved as soon as ``get_peft_model`` or
  ``add_adapter`` creates it, so that a layer or variant peft_gp refuses fails the test.

It prints both counts, the DoRA cases apart, and every test that passes plain but not with GP, grouped by message.
Needs ``parameterized``, ``scipy`` and ``diffusers`` beside pytest (PEFT's test helpers import them): they are
installed into the running environment when missing (``--no-install`` to refuse). Not part of ``make test``; see
CONTRIBUTING.md. Usage::

    .venv/bin/python scripts/peft_lora_suite.py                  # both runs, about 2 x 3 minutes on 2 cores
    .venv/bin/python scripts/peft_lora_suite.py --tests path/to/peft/tests -k "Conv2d"
"""

from __future__ import annotations

import argparse
import ast
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = ROOT / "tmp" / "peft-tests"  # /tmp/ is ignored by git
NEEDED = ("pytest", "parameterized", "scipy", "diffusers")
SWAPPED = ("test_custom_models.py", "testing_common.py", "testing_utils.py")  # where they import LoraConfig
SWAP_LINE = "from peft_gp import GPLoraConfig as LoraConfig  # swapped in by peft_gp's scripts/peft_lora_suite.py\n"

PLUGIN = '''"""Written by peft_gp's scripts/peft_lora_suite.py: keeps PEFT's LoRA cases, resolves GP adapters, records
every outcome in $PEFT_SUITE_RESULTS."""

import inspect
import json
import os
import re

import peft
import peft.mapping_func
import peft.peft_model
from peft import LoraConfig, PeftConfig, PeftModel

SWAP = os.environ.get("PEFT_SUITE_SWAP") == "1"
LORA = [LoraConfig]
if SWAP:
    import peft_gp
    from peft_gp import GPLoraConfig

    LORA.append(GPLoraConfig)

    def _resolve(model, config, adapter_name):
        if isinstance(config, GPLoraConfig) and isinstance(model, PeftModel):
            peft_gp.get_memory(model, adapter_name)  # resolves the adapter's groups: a refusal raises here

    _get_peft_model = peft.mapping_func.get_peft_model
    _signature = inspect.signature(_get_peft_model)

    def get_peft_model(*args, **kwargs):
        model = _get_peft_model(*args, **kwargs)
        bound = _signature.bind(*args, **kwargs)
        bound.apply_defaults()
        _resolve(model, bound.arguments["peft_config"], bound.arguments["adapter_name"])
        return model

    peft.get_peft_model = peft.mapping_func.get_peft_model = get_peft_model

    def _wrap(add_adapter):
        def wrapped(self, adapter_name, peft_config, *args, **kwargs):
            result = add_adapter(self, adapter_name, peft_config, *args, **kwargs)
            _resolve(self, peft_config, adapter_name)
            return result

        return wrapped

    for _cls in list(vars(peft.peft_model).values()):
        if isinstance(_cls, type) and issubclass(_cls, PeftModel) and "add_adapter" in _cls.__dict__:
            _cls.add_adapter = _wrap(_cls.__dict__["add_adapter"])

LORA_CALL = re.compile(r"(?<![A-Za-z_])LoraConfig\\(")
RESULTS = {}


def _mentions(value, classes):
    if isinstance(value, type):
        return value in classes
    if isinstance(value, (list, tuple, set)):
        return any(_mentions(v, classes) for v in value)
    if isinstance(value, dict):
        return any(_mentions(v, classes) for v in value.values())
    return type(value) in classes


def _is_lora(item):
    params = getattr(getattr(item, "callspec", None), "params", {})
    if any(_mentions(value, tuple(LORA)) for value in params.values()):
        return True
    if any(isinstance(v, type) and issubclass(v, PeftConfig) for v in params.values()):
        return False  # parametrized over another method
    try:
        return bool(LORA_CALL.search(inspect.getsource(item.function)))
    except (OSError, TypeError):
        return False


def _is_dora(item):
    params = getattr(getattr(item, "callspec", None), "params", {})
    found = [v for v in params.values() if isinstance(v, dict) and v.get("use_dora")]
    return bool(found) or "dora" in item.name.lower()


def pytest_collection_modifyitems(config, items):
    kept = [item for item in items if _is_lora(item)]
    dropped = [item for item in items if not _is_lora(item)]
    items[:] = kept
    config.hook.pytest_deselected(items=dropped)
    for item in kept:
        RESULTS[item.nodeid] = {"dora": _is_dora(item), "outcome": "not run", "message": ""}


def pytest_deselected(items):
    for item in items:
        RESULTS.pop(item.nodeid, None)


def pytest_runtest_logreport(report):
    entry = RESULTS.get(report.nodeid)
    if entry is None or entry["outcome"] in ("failed", "error"):
        return
    if report.failed:
        entry["outcome"] = "failed" if report.when == "call" else "error"
        entry["message"] = str(getattr(report, "longrepr", "") or "")[-4000:]
    elif report.skipped:
        entry["outcome"] = "skipped"
    elif report.when == "call":
        entry["outcome"] = "passed"


def pytest_sessionfinish(session, exitstatus):
    with open(os.environ["PEFT_SUITE_RESULTS"], "w") as handle:
        json.dump(RESULTS, handle, indent=1)
'''

INI = """[pytest]
# PEFT's own settings (pyproject.toml of the sdist) without coverage
markers =
    single_gpu_tests: tests that run on a single GPU
    multi_gpu_tests: tests that run on multiple GPUs
    regression: whether to run regression suite test
    bitsandbytes: select bitsandbytes integration tests
filterwarnings =
    error::DeprecationWarning:transformers
    ignore:.*BPE.__init__ will not create from files anymore.*:DeprecationWarning:transformers
    error::FutureWarning:transformers
"""


def fetch_tests(version: str, cache: Path) -> Path:
    """PEFT's ``tests`` folder of ``version``, from its sdist (downloaded once into ``cache``)."""
    tests = cache / f"peft-{version}" / "tests"
    if (tests / "test_custom_models.py").is_file():
        return tests
    cache.mkdir(parents=True, exist_ok=True)
    archive = cache / f"peft-{version}.tar.gz"
    if not archive.is_file():
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", f"peft=={version}"]
        subprocess.run([*command, "-d", str(cache)], check=True)
    with tarfile.open(archive) as sdist:
        members = [m for m in sdist.getmembers() if m.name.startswith(f"peft-{version}/tests/")]
        sdist.extractall(cache, members=members, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    if not (tests / "test_custom_models.py").is_file():
        raise SystemExit(f"The sdist of peft {version} holds no tests/test_custom_models.py ({archive}).")
    return tests


def ensure_tools(install: bool) -> None:
    missing = [name for name in NEEDED if importlib.util.find_spec(name) is None]
    if not missing:
        return
    if not install:
        raise SystemExit(f"Missing {missing}: pip install {' '.join(missing)} (or run without --no-install).")
    print(f"installing {missing} into {sys.prefix} for PEFT's test helpers (not a dependency of peft_gp)")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", *missing], check=True)


def swap_lora_config(path: Path) -> None:
    """Insert ``SWAP_LINE`` after the module's last top-level import: ``LoraConfig`` now names ``GPLoraConfig``
    (only where the module imports ``LoraConfig`` from peft)."""
    source = path.read_text()
    tree = ast.parse(source)
    imported = [
        node
        for node in tree.body
        if isinstance(node, ast.ImportFrom)
        and (node.module or "").startswith("peft")
        and any(alias.name == "LoraConfig" and alias.asname is None for alias in node.names)
    ]
    if not imported:
        return
    last = max(node.end_lineno for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom)))
    lines = source.splitlines(keepends=True)
    path.write_text("".join(lines[:last]) + SWAP_LINE + "".join(lines[last:]))


def prepare(tests: Path, folder: Path, swap: bool) -> Path:
    """A copy of PEFT's tests in ``folder/tests`` with the plugin (and, with ``swap``, GPLoraConfig swapped in)."""
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(tests, folder / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    (folder / "tests" / "__init__.py").touch()
    (folder / "tests" / "conftest.py").write_text(PLUGIN)
    (folder / "pytest.ini").write_text(INI)
    if swap:
        for name in SWAPPED:
            swap_lora_config(folder / "tests" / name)
    return folder


def run(folder: Path, swap: bool, extra: list[str]) -> dict:
    results = folder / "results.json"
    env = {**os.environ, "PEFT_SUITE_SWAP": "1" if swap else "0", "PEFT_SUITE_RESULTS": str(results)}
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "pytest", "tests/test_custom_models.py", "-q", "-p", "no:cacheprovider"]
    print(f"\n== {'GPLoraConfig' if swap else 'LoraConfig'}: {' '.join(command + extra)}", flush=True)
    subprocess.run([*command, "--tb=line", "-rN", *extra], cwd=folder, env=env)
    if not results.is_file():
        raise SystemExit(f"pytest wrote no results into {results}: see its output above.")
    data = json.loads(results.read_text())
    return {nodeid.replace("GPLoraConfig", "LoraConfig"): entry for nodeid, entry in data.items()}


def counts(results: dict, dora: bool | None = None) -> Counter:
    return Counter(e["outcome"] for e in results.values() if dora is None or e["dora"] == dora)


def line(label: str, counted: Counter) -> str:
    parts = ", ".join(f"{counted[key]} {key}" for key in ("passed", "failed", "error", "skipped", "not run"))
    return f"  {label:<24} {sum(counted.values()):>5} cases: {parts}"


def reason(message: str) -> str:
    """The line of a failure that says why (the last ``E   ...`` line, else the last line)."""
    found = [text.strip()[1:].strip() for text in message.splitlines() if text.strip().startswith("E ")]
    text = found[-1] if found else (message.strip().splitlines() or [""])[-1]
    return text[:300]


def report(plain: dict, gp: dict) -> int:
    print("\n== PEFT's LoRA cases of test_custom_models.py")
    for label, results in (("LoraConfig", plain), ("GPLoraConfig", gp)):
        print(f"{label}:")
        print(line("all", counts(results)))
        print(line("without DoRA", counts(results, dora=False)))
        print(line("DoRA", counts(results, dora=True)))
    worse = {nodeid: gp.get(nodeid, {"outcome": "missing", "message": ""}) for nodeid, e in plain.items()}
    worse = {n: e for n, e in worse.items() if plain[n]["outcome"] == "passed" and e["outcome"] != "passed"}
    print(f"\npassed with LoraConfig but not with GPLoraConfig: {len(worse)}")
    for why, number in Counter(reason(e["message"]) or e["outcome"] for e in worse.values()).most_common():
        print(f"  {number:>5} x {why}")
    for nodeid in sorted(worse)[:40]:
        print(f"        {nodeid}")
    return 1 if worse else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tests", type=Path, help="PEFT's tests folder (default: from the installed version's sdist)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the sdist and the runs go")
    parser.add_argument("--no-install", action="store_true", help="fail instead of installing missing test tools")
    parser.add_argument("--only", choices=("plain", "gp"), help="one of the two runs (the report needs both)")
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest (after --), e.g. -k Conv2d")
    args = parser.parse_args(argv)
    version = importlib.metadata.version("peft")
    tests = args.tests or fetch_tests(version, args.cache)
    ensure_tools(not args.no_install)
    print(f"peft {version}: PEFT's tests from {tests}")
    results = {}
    for name, swap in (("plain", False), ("gp", True)):
        if args.only in (None, name):
            results[name] = run(prepare(tests, args.cache / f"run-{name}", swap), swap, args.pytest_args)
    if len(results) < 2:
        only = next(iter(results.values()))
        print(line("all", counts(only)))
        return 0
    return report(results["plain"], results["gp"])


if __name__ == "__main__":
    sys.exit(main())
