"""`frozenvl serve MODEL_DIR` as users start it: a separate process, killed mid-stream and restarted."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

import frozenvl  # noqa: E402

from .conftest import perturb  # noqa: E402

SRC = str(Path(__file__).resolve().parents[1] / "src")
QUESTION = [{"role": "user", "content": "what colour is the big square"}]


@pytest.fixture(scope="module")
def model_dir(bases, tmp_path_factory) -> Path:
    llm, vis = bases()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        m = frozenvl.build(llm, vis, workflows={"mm": {"family": "prefix"}})
    perturb(m, "mm", seed=2)
    out = tmp_path_factory.mktemp("served") / "model"
    m.save_pretrained(out)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """`python -m frozenvl serve DIR --port P` in its own process, up once /health answers."""

    def __init__(self, model_dir: Path, port: int, log: Path):
        env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-m", "frozenvl", "serve", str(model_dir), "--port", str(port)],
                                     stdout=subprocess.DEVNULL, stderr=open(log, "wb"), env=env)
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited ({self.proc.returncode}): {log.read_text()[-2000:]}")
            try:
                self.client.models.list()
                return
            except openai.APIConnectionError:
                assert time.monotonic() < deadline, f"no server after 120 s: {log.read_text()[-2000:]}"
                time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


def _answer(client) -> str:
    r = client.chat.completions.create(model="mm", messages=QUESTION, temperature=0, max_tokens=12)
    return r.choices[0].message.content


def test_killed_mid_stream_then_restarted_serves_again(model_dir, tmp_path):
    port = _free_port()
    first = Served(model_dir, port, tmp_path / "first.log")
    try:
        assert [m.id for m in first.client.models.list().data] == ["text", "mm"]
        before = _answer(first.client)
        assert before
        stream = iter(first.client.chat.completions.create(model="mm", messages=QUESTION, temperature=0,
                                                           max_tokens=400, stream=True))
        next(stream)
        next(stream)
        first.proc.send_signal(signal.SIGKILL)  # mid-stream
        first.proc.wait(10)
        with pytest.raises(openai.APIConnectionError):  # the connection died under the client
            for _ in stream:
                pass
    finally:
        first.stop()

    second = Served(model_dir, port, tmp_path / "second.log")  # the same port, straight away
    try:
        assert _answer(second.client) == before
        pieces = [c.choices[0].delta.content or "" for c in
                  second.client.chat.completions.create(model="mm", messages=QUESTION, temperature=0, max_tokens=12,
                                                        stream=True) if c.choices]
        assert "".join(pieces) == before
        # the default limits: a 50 MB data URL is over the 32 MiB body limit, refused before it is parsed
        huge = "data:image/png;base64," + "A" * (50 * 1000 * 1000)
        with pytest.raises(openai.APIStatusError) as err:
            second.client.chat.completions.create(model="mm", messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": huge}}]}])
        assert err.value.status_code == 413 and "over the limit of 33,554,432 bytes" in err.value.body["message"]
        assert _answer(second.client) == before  # and it still serves
    finally:
        second.stop()


def test_serve_command_errors(tmp_path):
    from typer.testing import CliRunner

    from frozenvl.cli import app

    result = CliRunner().invoke(app, ["serve", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "does not exist" in result.output
