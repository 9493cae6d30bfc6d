"""A real ComfyUI server with this pack installed, for end-to-end tests (the HTTP API test here, the
frontend's browser test too).

    with ComfyUIServer(comfyui_dir, models_dir) as server:   # starts headless on the CPU
        server.get("/object_info")
        prompt_id = server.queue(api_prompt)
        entry = server.wait(prompt_id)                        # the /history entry

It runs `main.py --cpu --listen 127.0.0.1 --port N --disable-auto-launch` with
`--base-directory TMP` (TMP/custom_nodes/ComfyUI-SANA links to this repo; input/, output/, temp/
and user/ live there too, so the ComfyUI checkout is never written to) and
`--extra-model-paths-config TMP/extra_model_paths.yaml` pointing at `models_dir` (ComfyUI's layout:
diffusion_models/, text_encoders/, vae/, loras/). Only the standard library is used (the HTTP client and
a minimal websocket reader for progress messages).
"""
import base64
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACK_NAME = "ComfyUI-SANA"


def comfyui_paths():
    """(ComfyUI checkout, its python) from COMFYUI_DIR / COMFYUI_PYTHON, or None when not set."""
    root = os.environ.get("COMFYUI_DIR")
    if not root or not (Path(root) / "main.py").is_file():
        return None
    return Path(root), os.environ.get("COMFYUI_PYTHON") or sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyUIServer:
    def __init__(self, comfyui_dir, models_dir, *, python=None, port=None, extra_args=(), startup_timeout=180):
        self.comfyui_dir, self.models_dir = Path(comfyui_dir), Path(models_dir)
        self.python = python or sys.executable
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra_args, self.startup_timeout = list(extra_args), startup_timeout
        self.base = self.process = self.log_path = None
        self.client_id = uuid.uuid4().hex

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self):
        self.base = Path(tempfile.mkdtemp(prefix="comfyui-sana-e2e-"))
        for sub in ("custom_nodes", "input", "output", "temp", "user"):
            (self.base / sub).mkdir()
        (self.base / "custom_nodes" / PACK_NAME).symlink_to(REPO, target_is_directory=True)
        config = self.base / "extra_model_paths.yaml"
        folders = "\n".join(f"    {f}: {f}" for f in ("diffusion_models", "checkpoints", "text_encoders", "vae",
                                                       "controlnet", "loras"))
        config.write_text(f"sana_e2e:\n    base_path: {self.models_dir}\n{folders}\n")
        self.log_path = self.base / "comfyui.log"
        command = [self.python, str(self.comfyui_dir / "main.py"), "--cpu", "--listen", "127.0.0.1",
                   "--port", str(self.port), "--disable-auto-launch", "--base-directory", str(self.base),
                   "--extra-model-paths-config", str(config), "--database-url", "sqlite:///:memory:",
                   *self.extra_args]
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1",
                   CUDA_VISIBLE_DEVICES="")
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(command, cwd=self.comfyui_dir, stdout=self._log, stderr=subprocess.STDOUT,
                                        env=env, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with code {self.process.returncode} while starting:\n{self.log_tail()}")
            try:
                self.get("/system_stats", timeout=2)
                return self
            except (OSError, urllib.error.URLError):
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"ComfyUI did not answer within {self.startup_timeout} s:\n{self.log_tail()}")

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if getattr(self, "_log", None):
            self._log.close()
        if self.base is not None and os.environ.get("COMFYUI_KEEP_BASE") != "1":
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, chars=6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except (OSError, AttributeError):
            return ""

    @property
    def input_dir(self) -> Path:
        return self.base / "input"

    @property
    def output_dir(self) -> Path:
        return self.base / "output"

    # -- HTTP -----------------------------------------------------------------------------------
    def get(self, path, timeout=30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def post(self, path, data=None, timeout=30):
        request = urllib.request.Request(self.url + path, data=json.dumps(data or {}).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as r:
                body = r.read()
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"POST {path} -> {e.code}: {e.read().decode(errors='replace')[:3000]}") from None
        return json.loads(body) if body.strip() else None

    def queue(self, prompt: dict) -> str:
        """POST /prompt; returns the prompt id (validation errors raise with ComfyUI's answer)."""
        return self.post("/prompt", {"prompt": prompt, "client_id": self.client_id})["prompt_id"]

    def wait(self, prompt_id: str, timeout=300) -> dict:
        """The /history entry of a finished prompt (success, error or interrupted)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                entry = history[prompt_id]
                if entry["status"].get("status_str") in ("success", "error") or entry["status"]["messages"]:
                    return entry
            if not self.alive:
                raise RuntimeError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            time.sleep(0.25)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout} s:\n{self.log_tail()}")

    def interrupt(self):
        self.post("/interrupt")

    def websocket(self, timeout=60) -> "WebSocket":
        """Messages ComfyUI sends this client (progress, executing, executed, ...)."""
        return WebSocket("127.0.0.1", self.port, f"/ws?clientId={self.client_id}", timeout)


def history_messages(entry: dict) -> dict:
    """{event: data} of a /history entry's status messages."""
    return {event: data for event, data in entry.get("status", {}).get("messages", [])}


class WebSocket:
    """Just enough of RFC 6455 to read a local server's text messages (binary previews are skipped)."""

    def __init__(self, host, port, path, timeout):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self._recv()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        if b" 101 " not in head.split(b"\r\n")[0]:
            raise ConnectionError(f"websocket upgrade refused: {head[:200]!r}")

    def _recv(self):
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("websocket closed")
        return data

    def _read(self, n):
        while len(self.buffer) < n:
            self.buffer += self._recv()
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def receive(self) -> dict:
        """The next JSON text message, or a node's progress text (a binary TEXT event) as
        {"type": "progress_text", "data": {"node": id, "text": text}}."""
        while True:
            b0, b1 = self._read(2)
            length = b1 & 0x7F
            if length == 126:
                length = struct.unpack(">H", self._read(2))[0]
            elif length == 127:
                length = struct.unpack(">Q", self._read(8))[0]
            mask = self._read(4) if b1 & 0x80 else None
            payload = self._read(length)
            if mask:
                payload = bytes(c ^ mask[i % 4] for i, c in enumerate(payload))
            opcode = b0 & 0x0F
            if opcode == 0x8:
                raise ConnectionError("websocket closed by the server")
            if opcode == 0x1:
                return json.loads(payload)
            if opcode == 0x2 and struct.unpack(">I", payload[:4])[0] == 3:  # BinaryEventTypes.TEXT
                n = struct.unpack(">I", payload[4:8])[0]
                return {"type": "progress_text", "data": {"node": payload[8:8 + n].decode(),
                                                           "text": payload[8 + n:].decode()}}

    def wait_for(self, predicate, timeout=120) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = self.receive()
            if predicate(message):
                return message
        raise TimeoutError("no matching websocket message")

    def close(self):
        self.sock.close()
