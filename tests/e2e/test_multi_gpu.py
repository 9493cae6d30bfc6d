"""SanaModelLoader's gpus against a real ComfyUI server (headless, CPU) with one gloo CPU worker process
(gpus "cpu,cpu") and the tiny demo models: the image equals the one-process image, Cancel stops sampling
mid-run, and a worker killed mid-run ends that prompt with a clear error while the server keeps serving
and the next prompt starts the workers again. Enabled as tests/e2e/test_comfyui_server.py is."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from comfyui_server import ComfyUIServer, comfyui_paths, history_messages  # noqa: E402
from test_comfyui_server import node_of, run_ok, small  # noqa: E402

PATHS = comfyui_paths()
pytestmark = pytest.mark.skipif(PATHS is None, reason="set COMFYUI_DIR to a ComfyUI checkout (and COMFYUI_PYTHON to "
                                                      "its interpreter) to run the end-to-end ComfyUI tests")
WORKFLOW = "sana_1024_text_to_image.json"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from sana_core.demo import write_demo_models
    models = tmp_path_factory.mktemp("e2e-multi-gpu-models")
    write_demo_models(models)
    comfyui_dir, python = PATHS
    with ComfyUIServer(comfyui_dir, models, python=python) as s:
        yield s
        print(f"\n--- ComfyUI log (tail) ---\n{s.log_tail(3000)}")


def shared(prompt, gpus="cpu,cpu"):
    prompt[node_of(prompt, "SanaModelLoader")]["inputs"]["gpus"] = gpus
    return prompt


def image(server, entry, prompt):
    saved, = entry["outputs"][node_of(prompt, "SaveImage")]["images"]
    with Image.open(server.output_dir / saved["subfolder"] / saved["filename"]) as png:
        return np.asarray(png.convert("RGB"), dtype=np.int16)


def workers_of(server):
    """The pids of the SANA worker processes the server started."""
    out = subprocess.run(["ps", "-ww", "-o", "pid=,args=", "--ppid", str(server.process.pid)], capture_output=True,
                         text=True)
    return [int(line.split()[0]) for line in out.stdout.splitlines() if "sana_core.parallel import serve" in line]


def run_until_step(server, prompt, step, action):
    """Queues `prompt`, does action() once its sampler reported `step` steps; returns the /history entry."""
    sampler = node_of(prompt, "SanaSampler")
    socket = server.websocket()
    try:
        prompt_id = server.queue(prompt)
        socket.wait_for(lambda m: m.get("type") == "progress" and m["data"]["node"] == sampler
                        and m["data"]["value"] >= step, timeout=300)
        action()
    finally:
        socket.close()
    return server.wait(prompt_id)


def test_the_image_equals_the_one_process_image(server):
    one = small(WORKFLOW)
    two = shared(small(WORKFLOW))
    single = image(server, run_ok(server, one), one)
    entry = run_ok(server, two)
    assert len(workers_of(server)) == 1
    assert np.abs(image(server, entry, two) - single).max() <= 1  # float32 rounding, then 8 bits


def test_cancel_stops_sampling_mid_run(server):
    prompt = shared(small(WORKFLOW, steps=1000, size=512))
    entry = run_until_step(server, prompt, 2, server.interrupt)
    messages = history_messages(entry)
    assert messages["execution_interrupted"]["node_type"] == "SanaSampler", entry["status"]
    run_ok(server, shared(small(WORKFLOW)))


def test_a_killed_worker_ends_the_prompt_clearly_and_the_next_prompt_runs(server):
    prompt = shared(small(WORKFLOW, steps=1000, size=512))
    worker, = workers_of(server)
    entry = run_until_step(server, prompt, 2, lambda: os.kill(worker, signal.SIGKILL))
    error = history_messages(entry)["execution_error"]
    assert error["node_type"] == "SanaSampler", json.dumps(entry["status"])[:3000]
    assert "SANA worker process on cpu (rank 1) was killed by signal 9" in error["exception_message"], error
    assert server.alive
    run_ok(server, shared(small(WORKFLOW)))
    assert workers_of(server) and workers_of(server) != [worker]  # started again
