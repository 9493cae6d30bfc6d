import importlib
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_sana_core_imports_without_comfyui():
    code = "import sana_core, sys; assert 'comfy' not in sys.modules and 'folder_paths' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_kernels_package_is_ours():
    kernels = importlib.import_module("sana_core.kernels")
    assert Path(kernels.__file__).resolve().parent == ROOT / "kernels"


def test_root_imports_as_a_comfyui_custom_node_package(tmp_path):
    """ComfyUI imports the folder as a package named after it, with its own `nodes` module on sys.path."""
    (tmp_path / "nodes.py").write_text("COMFY_CORE = True\n")  # stands in for ComfyUI's core module
    code = f"""
import importlib.util, sys
sys.path.insert(0, {str(tmp_path)!r})
import nodes
spec = importlib.util.spec_from_file_location("ComfyUI-SANA", {str(ROOT / '__init__.py')!r},
                                              submodule_search_locations=[{str(ROOT)!r}])
pack = importlib.util.module_from_spec(spec); sys.modules["ComfyUI-SANA"] = pack; spec.loader.exec_module(pack)
assert nodes.COMFY_CORE and sys.modules["nodes"] is nodes
assert pack.WEB_DIRECTORY == "./js"
assert isinstance(pack.NODE_CLASS_MAPPINGS, dict)
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
