"""ComfyUI entry point. ComfyUI imports this folder as a package named after the folder.

Our packages are imported by their own names (sana_core, sana_core.kernels, sana_nodes)
straight from this folder, so nothing depends on sys.path order and no import can resolve
to the unrelated PyPI package "kernels" or to ComfyUI's own "nodes" module.
"""
import importlib.util
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent


def _import_folder(name: str, folder: str) -> None:
    if name in sys.modules:
        return
    path = _ROOT / folder
    spec = importlib.util.spec_from_file_location(name, path / "__init__.py", submodule_search_locations=[str(path)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


_import_folder("sana_core.kernels", "kernels")
_import_folder("sana_core", "sana_core")
_import_folder("sana_nodes", "nodes")

from sana_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

WEB_DIRECTORY = "./js"
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
