"""Import sana_core from this checkout on a machine where the project is not pip-installed (the GPU box):
kernels/ is registered as sana_core.kernels, as `pip install -e .` and the root __init__.py do."""
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def import_sana():
    try:
        import sana_core.kernels  # noqa: F401  (installed)
    except ImportError:
        sys.path.insert(0, str(ROOT))
        spec = importlib.util.spec_from_file_location("sana_core.kernels", ROOT / "kernels" / "__init__.py",
                                                      submodule_search_locations=[str(ROOT / "kernels")])
        module = importlib.util.module_from_spec(spec)
        sys.modules["sana_core.kernels"] = module
        spec.loader.exec_module(module)
    import sana_core
    return sana_core
