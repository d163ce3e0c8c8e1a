"""The package's import rules (../shared/ARCHITECTURE.md, docs/architecture.md): who may import
whom, checked on the source (every import statement, at any depth, lazy ones included) and
on what really loads (a fresh interpreter per entry point).

    api/       HTTP only: imports frontend, never engine internals, runner, core, kernels
    frontend/  output processing and the core client: never runner or kernels; only
               core_client.py reaches into core/ (to start it or step it in-process)
    engine/    the pure control plane: no torch, nothing above it
    core/      the engine core: engine + runner + models, never frontend or api
    runner/    the GPU side: engine's contracts, models, kernels; never core/frontend/api
    models/    never engine, runner, core, frontend, api
    kernels/   nothing of the package but their own helpers
    serve_ray/ Ray Serve (the optional `ray` extra): as api/, and the only importer of ray
"""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "tpaserve"


def imports(folder: str) -> dict[str, set[str]]:
    found = {}
    root = PKG / folder if folder else PKG
    paths = root.rglob("*.py") if folder else root.glob("*.py")
    for path in paths:
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
                names |= {f"{node.module}.{a.name}" for a in node.names}
        found[str(path.relative_to(PKG))] = names
    return found


def offenders(folder: str, prefixes: tuple[str, ...], allow: tuple[str, ...] = ()) -> list[str]:
    """Imports of `folder`'s modules that start with one of `prefixes` (files in `allow`
    excepted)."""
    return [f"{f}: {m}" for f, mods in imports(folder).items() if f not in allow
            for m in sorted(mods) if m.startswith(prefixes)]


RULES = [
    # (folder, forbidden prefixes, files allowed to break the rule)
    ("api", ("tpaserve.engine.scheduler", "tpaserve.engine.block_manager",
             "tpaserve.engine.request", "tpaserve.runner", "tpaserve.core",
             "tpaserve.kernels", "torch"), ()),
    ("frontend", ("tpaserve.runner", "tpaserve.kernels", "tpaserve.api", "torch"), ()),
    ("frontend", ("tpaserve.core",), ("frontend/core_client.py",)),
    ("engine", ("tpaserve.api", "tpaserve.frontend", "tpaserve.core", "tpaserve.runner",
                "tpaserve.kernels", "tpaserve.models", "torch", "triton", "numpy"), ()),
    ("core", ("tpaserve.api", "tpaserve.frontend"), ()),
    ("runner", ("tpaserve.api", "tpaserve.frontend", "tpaserve.core"), ()),
    ("models", ("tpaserve.engine", "tpaserve.runner", "tpaserve.core", "tpaserve.frontend",
                "tpaserve.api"), ()),
    ("kernels", ("tpaserve.engine", "tpaserve.runner", "tpaserve.core", "tpaserve.frontend",
                 "tpaserve.api", "tpaserve.models"), ()),
    # Ray Serve's deployments and routers sit where api/ does: no engine internals, no torch
    ("serve_ray", ("tpaserve.engine", "tpaserve.runner", "tpaserve.core", "tpaserve.kernels",
                   "tpaserve.models", "torch"), ()),
    # the package's top-level modules (config, args, exceptions, sampling_params) are pure
    ("", ("torch", "triton", "tpaserve.engine", "tpaserve.runner", "tpaserve.core",
          "tpaserve.api"), ("__init__.py", "__main__.py")),
]


@pytest.mark.parametrize("folder,forbidden,allow", RULES,
                         ids=[f"{r[0] or 'top'}-{r[1][0]}" for r in RULES])
def test_import_rules(folder, forbidden, allow):
    assert offenders(folder, forbidden, allow) == []


def test_only_api_imports_fastapi_and_pydantic():
    for folder in ("engine", "kernels", "models", "runner", "core", "frontend"):
        assert offenders(folder, ("fastapi", "pydantic", "starlette", "uvicorn")) == []


def test_only_serve_ray_imports_ray():
    """ray is an optional extra (tpaserve[ray]): nothing else may need it."""
    folders = [p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()]
    for folder in [f for f in folders if f != "serve_ray"] + [""]:
        assert offenders(folder, ("ray",)) == [], folder


def test_exceptions_live_in_one_module():
    """Every exception class of the package is defined in tpaserve/exceptions.py, but the
    HTTP layer's own (api/errors.py) and the kernels' input check."""
    allowed = {"exceptions.py", "api/errors.py", "kernels/_validate.py",
               "frontend/core_client.py"}       # CoreStartError: the CLI's, of spawning
    found = []
    for path in PKG.rglob("*.py"):
        rel = str(path.relative_to(PKG))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                    getattr(b, "id", getattr(b, "attr", "")).endswith(("Error", "Exception"))
                    for b in node.bases) and rel not in allowed:
                found.append(f"{rel}: {node.name}")
    assert found == []


def loads(code: str) -> set[str]:
    """The top-level packages a fresh interpreter has loaded after `code`."""
    out = subprocess.run([sys.executable, "-c", code + "; import sys; print(sorted(sys.modules))"],
                         capture_output=True, text=True, check=True)
    return set(eval(out.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("entry", [
    "import tpaserve.engine.scheduler, tpaserve.engine.block_manager, tpaserve.engine.messages",
    # the API process: HTTP, output processing, the core client, the CLI
    "import tpaserve.api.server, tpaserve.api.cli, tpaserve.frontend.async_llm",
    "import tpaserve.args, tpaserve.config, tpaserve.sampling_params, tpaserve.exceptions",
    "import tpaserve.serve_ray.cli, tpaserve.serve_ray.forward",
])
def test_entry_points_load_no_torch(entry):
    """The control plane and the whole API process run without torch (nor numpy's share of
    it): the engine core process is the only one that loads it."""
    assert "torch" not in loads(entry)
