"""The package's layers (DESIGN: arrows only point down; nothing below views/ imports views/) and a light import."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_layer_contract_holds():
    """import-linter's layers contract from pyproject.toml: a broken arrow fails with the offending import."""
    out = subprocess.run([str(Path(sys.executable).parent / "lint-imports"), "--config", str(ROOT / "pyproject.toml")],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "1 kept, 0 broken" in out.stdout


def test_package_has_no_import_cycle():
    import grimp

    graph = grimp.build_graph("qeff_lab")
    cycles = [m for m in graph.modules
              if any(graph.chain_exists(importer=m2, imported=m) for m2 in graph.find_modules_directly_imported_by(m))]
    assert not cycles, f"modules on an import cycle: {sorted(cycles)}"


def test_import_is_light():
    """`import qeff_lab` loads neither torch nor transformers (they load when a model class is first used)."""
    code = ("import sys, time; t = time.perf_counter(); import qeff_lab; dt = time.perf_counter() - t; "
            "print(dt, 'torch' in sys.modules, 'transformers' in sys.modules, 'socket' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[1:3] == ["False", "False"], out
    assert float(out[0]) < 2.0


def test_lazy_attribute_resolves():
    import qeff_lab

    assert qeff_lab.QEFFAutoModelForCausalLM.__name__ == "QEFFAutoModelForCausalLM"
    assert "QEFFAutoModel" in dir(qeff_lab)
