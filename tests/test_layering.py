"""The package's import rules (../shared/ARCHITECTURE.md): the control plane is pure Python,
engine/ never imports api/, kernels/ nothing from engine/, only api/ imports FastAPI and
pydantic."""
import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "tpaserve"


def imports(folder: str) -> dict[str, set[str]]:
    found = {}
    for path in (PKG / folder).rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
        found[str(path.relative_to(PKG))] = names
    return found


def offenders(folder: str, prefixes: tuple[str, ...]) -> list[str]:
    return [f"{f}: {m}" for f, mods in imports(folder).items() for m in sorted(mods)
            if m.startswith(prefixes)]


def test_engine_never_imports_api():
    assert offenders("engine", ("tpaserve.api",)) == []


def test_kernels_import_nothing_from_engine():
    assert offenders("kernels", ("tpaserve.engine",)) == []


def test_only_api_imports_fastapi_and_pydantic():
    for folder in ("engine", "kernels", "models"):
        assert offenders(folder, ("fastapi", "pydantic", "starlette", "uvicorn")) == []


def test_scheduler_and_block_manager_load_no_torch():
    code = ("import sys, tpaserve.engine.scheduler, tpaserve.engine.block_manager; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
