"""The js/ extension in the real ComfyUI frontend, in headless Chromium.

Enabled like the end-to-end test: COMFYUI_DIR points at a ComfyUI checkout (COMFYUI_PYTHON at its
interpreter, default: python3). It starts that ComfyUI (which serves its real comfyui-frontend-package)
on the CPU with this pack and the demo models, and tests/e2e/browser_check.mjs drives it with Playwright,
every request not to 127.0.0.1 aborted: round-1 values (preset labels, device "gpu") pass ComfyUI's own
validation; every shipped UI workflow loads with every node rendered, no "missing node" dialog and no
console error; its nodes keep their sizes over three tab switches and a re-drop of the saved file, and
the "not installed" toast does not come back on a tab switch; typing 16:9 into the preset filter finds
the 16:9 presets; the preset combo and the width prompt set and snap the size; a loader naming an absent
file says so with its folder; every workflow runs (64x64, 2 steps) and puts its stats on SanaSampler; no
two nodes overlap on first load (with the warnings) or after a run, and the saved view shows every node
at 1600x1000. Screenshots go to $SANA_SCREENSHOT_DIR (default: a pytest temporary folder), printed at
the end.

Needs Node 20+, Chromium (Debian: apt-get install -y chromium) and playwright-core installed outside
the repo without browser downloads:
    PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm install --prefix ~/.cache/sana-browser playwright-core
(SANA_CHROMIUM and SANA_PLAYWRIGHT_DIR override those places). No GPU is used.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comfyui_server import ComfyUIServer, comfyui_paths  # noqa: E402  (the end-to-end test's server)

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("SANA_CHROMIUM", "/usr/bin/chromium")
PLAYWRIGHT_DIR = Path(os.environ.get("SANA_PLAYWRIGHT_DIR", Path.home() / ".cache" / "sana-browser"))
NODE = shutil.which("node")

pytestmark = pytest.mark.skipif(comfyui_paths() is None,
                                reason="set COMFYUI_DIR to a ComfyUI checkout to run the browser test")


def test_shipped_workflows_in_the_real_frontend(tmp_path, capsys):
    needs = {"node (Node.js 20+)": NODE, f"Chromium at {CHROMIUM}": Path(CHROMIUM).exists() or None,
             f"playwright-core in {PLAYWRIGHT_DIR}": (PLAYWRIGHT_DIR / "node_modules" / "playwright-core").is_dir() or None}
    missing = [what for what, found in needs.items() if not found]
    if missing:
        pytest.skip(f"missing {', '.join(missing)}: apt-get install -y chromium nodejs; "
                    f"PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm install --prefix {PLAYWRIGHT_DIR} playwright-core")
    workflows = sorted(str(p) for p in (ROOT / "workflows").glob("*.json"))
    assert workflows, "no UI workflows in workflows/"
    shots = Path(os.environ.get("SANA_SCREENSHOT_DIR") or tmp_path / "screenshots")

    from sana_core.demo import write_demo_models

    write_demo_models(tmp_path / "models")
    comfyui_dir, python = comfyui_paths()
    with ComfyUIServer(comfyui_dir, tmp_path / "models", python=python) as server:
        out = subprocess.run(
            [NODE, str(ROOT / "tests" / "e2e" / "browser_check.mjs"), "--url", server.url, "--screenshots",
             str(shots), *workflows],
            capture_output=True, text=True, timeout=540,
            env=dict(os.environ, SANA_CHROMIUM=CHROMIUM, SANA_PLAYWRIGHT_DIR=str(PLAYWRIGHT_DIR)))
        server_log = server.log_tail(3000)
    with capsys.disabled():
        print(f"\n--- browser check (screenshots in {shots}) ---\n{out.stdout}{out.stderr}")
    assert out.returncode == 0, f"{out.stdout[-6000:]}{out.stderr[-6000:]}\n--- ComfyUI log ---\n{server_log}"
    assert "BROWSER CHECK PASSED" in out.stdout
    assert sorted(p.name for p in shots.glob("*.png"))
