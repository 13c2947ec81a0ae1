"""`frozenvl serve`: a real uvicorn server on a free port (in a thread of this process, so tests can
watch what the server touches), driven by the official `openai` client."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
try:  # the HTTP client the openai package itself is built on (httpx2 in its newer releases)
    import httpx2 as httpx
except ImportError:
    httpx = pytest.importorskip("httpx")

import frozenvl  # noqa: E402
from frozenvl.serve import media  # noqa: E402
from frozenvl.serve.app import ServerThread, create_app  # noqa: E402
from frozenvl.serve.engine import Engine, Finished, Sampling  # noqa: E402
from frozenvl.serve.limits import MIB, Limits  # noqa: E402

from .conftest import perturb  # noqa: E402

WORKFLOWS = {
    "mm": {"family": "prefix"},
    "xa": {"family": "cross_attention", "every": 1, "resampler_depth": 1, "resampler_latents": 4,
           "resampler_heads": 2, "resampler_head_dim": 8},
}
PERTURB = {"mm": (2, 0.05), "xa": (2, 0.02)}  # workflow weights with answers that are not one repeated token
KEY = "sk-test"
CHROMIUM = "/usr/bin/chromium"


# ------------------------------------------------------------------ fixtures and helpers
@pytest.fixture(scope="module")
def model(bases):
    llm, vis = bases()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        m = frozenvl.build(llm, vis, workflows=WORKFLOWS)
    for task, (seed, scale) in PERTURB.items():
        perturb(m, task, seed=seed, scale=scale)
    return m


@pytest.fixture(scope="module")
def media_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    inside, outside = root / "allowed", root / "outside"
    inside.mkdir()
    outside.mkdir()
    (inside / "ok.png").write_bytes(png())
    (outside / "secret.png").write_bytes(png())
    os.symlink(outside / "secret.png", inside / "link.png")  # inside by name, outside in fact
    return inside, outside


@pytest.fixture(scope="module")
def server(model, media_dirs):
    """The main server: an API key, local media under one directory, a body limit above 50 MB (so the
    50 MB image reaches the image check), the default 10 MiB image limit."""
    limits = Limits(max_body_bytes=64 * MIB, allowed_local_media_path=str(media_dirs[0]), max_batch_size=8)
    engine = Engine(model, max_batch_size=limits.max_batch_size, max_queue=limits.max_queue)
    with ServerThread(create_app(model, limits, api_key=KEY, engine=engine)) as s:
        s.engine = engine
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def png(colour=(200, 30, 30), size=(30, 20), stripe=True) -> bytes:
    img = Image.new("RGB", size, colour)
    if stripe:
        for x in range(size[0] // 3):
            for y in range(size[1]):
                img.putpixel((x, y), (20, 20, 220))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def data_url(raw: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(raw).decode()


def user(text: str, *image_urls: str) -> dict:
    if not image_urls:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [*({"type": "image_url", "image_url": {"url": u}} for u in image_urls),
                                        {"type": "text", "text": text}]}


def reference(model, task: str, text: str, images: list[bytes], max_tokens: int) -> tuple[str, int, int, list[int]]:
    """What `model.generate` gives for the request: (text, prompt tokens, completion tokens, tokens).
    The prompt is written out here as docs/serve.md specifies it: images first, one `<image>\\n` each."""
    prompt = model.render_chat([{"role": "user", "content": "<image>\n" * len(images) + text}])
    pil = [Image.open(io.BytesIO(b)) for b in images]
    batch = model.prepare_inputs(prompt, pil or None, task, add_special_tokens=False)
    out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         pixel_values=batch["pixel_values"], task=task, max_new_tokens=max_tokens)[0].tolist()
    eos = set(frozenvl.generation.eos_token_ids(model))
    cut = next((i for i, t in enumerate(out) if t in eos), None)
    tokens = out if cut is None else out[: cut + 1]
    body = tokens if cut is None else tokens[:-1]
    return model.tokenizer.decode(body, skip_special_tokens=True), batch["input_ids"].shape[1], len(tokens), tokens


def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the server"
        time.sleep(0.01)


def error_of(fn) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as info:
        fn()
    body = info.value.body
    assert set(body) == {"message", "type", "param", "code"}, body  # the openai client unwraps {"error": ...}
    return info.value


CASES = [  # (task, prompt, image colours, max_tokens)
    ("text", "what colour is the big square", [], 12),
    ("mm", "what is in the picture", [(200, 30, 30)], 12),
    ("xa", "compare the two pictures", [(30, 200, 30), (90, 10, 160)], 10),
    ("mm", "describe it", [], 9),  # image-free: routed to the base (text_fallback)
]


def _request(c, task, text, colours, max_tokens, **kw):
    urls = [data_url(png(col)) for col in colours]
    return c.chat.completions.create(model=task, messages=[user(text, *urls)], temperature=0,
                                     max_tokens=max_tokens, **kw)


# ------------------------------------------------------------------ the API
def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["text", "mm", "xa"]
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["queued"] == 0


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{len(c[2])}img" for c in CASES])
def test_answer_equals_model_generate(client, model, case):
    task, text, colours, n = case
    want, prompt_tokens, completion_tokens, tokens = reference(model, task, text, [png(c) for c in colours], n)
    assert len(set(tokens)) >= 3, f"degenerate reference {tokens}"
    r = _request(client, task, text, colours, n)
    assert r.choices[0].message.content == want
    assert r.choices[0].message.role == "assistant" and r.model == task and r.object == "chat.completion"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (prompt_tokens, completion_tokens)
    assert r.usage.total_tokens == prompt_tokens + completion_tokens
    eos = frozenvl.generation.eos_token_ids(model)
    assert r.choices[0].finish_reason == ("stop" if tokens[-1] in eos else "length")


def test_images_change_the_answer(client):
    a = _request(client, "mm", "what is in the picture", [(200, 30, 30)], 12).choices[0].message.content
    b = _request(client, "mm", "what is in the picture", [(10, 10, 10)], 12).choices[0].message.content
    assert a != b


def test_streamed_equals_non_streamed_with_usage(client):
    whole = _request(client, "mm", "what is in the picture", [(200, 30, 30)], 12)
    chunks = list(_request(client, "mm", "what is in the picture", [(200, 30, 30)], 12, stream=True,
                           stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 2 and "".join(pieces) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])


def test_raw_sse_ends_with_done_and_stop_strings(client, server, model):
    full = _request(client, "text", "what colour is the big square", [], 12).choices[0].message.content
    stop = full[3:6]
    assert stop and full.find(stop) == 3, full
    body = {"model": "text", "messages": [user("what colour is the big square")], "temperature": 0, "max_tokens": 12,
            "stream": True, "stop": [stop]}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    streamed = _request(client, "text", "what colour is the big square", [], 12, stop=stop)
    assert streamed.choices[0].message.content == full[:3] and streamed.choices[0].finish_reason == "stop"
    assert full[:3] == model.chat([user("what colour is the big square")], task="text", max_new_tokens=12, stop=[stop])


def test_concurrent_greedy_equals_sequential_and_batches(client, server, monkeypatch):
    """8 greedy requests over three workflows, with and without images: sent together (held until all
    are queued, so they batch) they give exactly what each gives sent alone."""
    reqs = [CASES[k % len(CASES)] for k in range(8)]
    reqs = [(t, f"{p} number {k}", c, n + k % 3) for k, (t, p, c, n) in enumerate(reqs)]

    def ask(r):
        out = _request(client, *r)
        return out.choices[0].message.content, out.usage.completion_tokens, out.choices[0].finish_reason

    sequential = [ask(r) for r in reqs]
    engine = server.engine
    release, inner = threading.Event(), engine._run
    first = []

    def held(batch):
        if not first:  # hold the worker on the first batch until the other 7 are queued
            first.append(batch)
            release.wait(30)
        return inner(batch)

    monkeypatch.setattr(engine, "_run", held)
    log_start = len(engine.batch_log)
    with ThreadPoolExecutor(8) as pool:
        # the first request alone, until the worker holds it: otherwise the worker's first batch takes
        # however many requests happen to have arrived, and what is left to batch depends on timing
        futures = [pool.submit(ask, reqs[0])]
        deadline = time.monotonic() + 30
        while not first and time.monotonic() < deadline:
            time.sleep(0.01)
        futures += [pool.submit(ask, r) for r in reqs[1:]]
        while engine.status()["queued"] + sum(len(b) for b in first) < 8 and time.monotonic() < deadline:
            time.sleep(0.01)
        release.set()
        concurrent = [f.result() for f in futures]
    batches = list(engine.batch_log)[log_start:]
    assert concurrent == sequential, batches
    assert max(rows for _, rows in batches) >= 3, batches  # really batched
    assert len({s[0] for s in sequential}) > 4  # the answers differ between requests


# ------------------------------------------------------------------ errors: status and OpenAI body
def test_unknown_model_404(client):
    e = error_of(lambda: client.chat.completions.create(model="nope", messages=[user("hi")]))
    assert e.status_code == 404 and e.body["code"] == "model_not_found" and e.body["param"] == "model"
    assert "text, mm, xa" in e.body["message"]


def test_api_key_401(server):
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    e = error_of(lambda: wrong.models.list())
    assert e.status_code == 401 and e.body["code"] == "invalid_api_key"
    e = error_of(lambda: wrong.chat.completions.create(model="text", messages=[user("hi")]))
    assert e.status_code == 401
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "text", "messages": [user("hi")]})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/health").status_code == 200  # health needs no key


@pytest.mark.parametrize("extra,names", [
    ({"n": 2}, ["n"]),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, ["tools"]),
    ({"logprobs": True, "top_logprobs": 2}, ["logprobs", "top_logprobs"]),
    ({"response_format": {"type": "json_object"}, "presence_penalty": 0.5}, ["presence_penalty", "response_format"]),
])
def test_unsupported_fields_400_names_them(client, extra, names):
    e = error_of(lambda: client.chat.completions.create(model="text", messages=[user("hi")], **extra))
    assert e.status_code == 400 and e.body["param"] == names[0] and e.body["code"] == "unsupported_parameter"
    assert all(n in e.body["message"] for n in names)


def test_neutral_values_of_unsupported_fields_are_accepted(client):
    r = client.chat.completions.create(model="text", messages=[user("hi")], n=1, logprobs=False, temperature=0,
                                       max_tokens=3, presence_penalty=0)
    assert r.usage.completion_tokens >= 1


@pytest.mark.parametrize("content,status,where,words", [
    ([{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"not a png").decode()}}],
     400, "messages[0].content[0]", "not a recognised image"),
    ([{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}],
     400, "messages[0].content[1]", "invalid base64"),
    ([{"type": "image_url", "image_url": {"url": "data:text/plain;base64,aGk="}}], 400, "messages[0].content[0]",
     "not an image"),
    ([{"type": "audio", "audio": {}}], 400, "messages[0].content[0]", "unsupported content part"),
    ([{"type": "image_url", "image_url": {"url": "ftp://x/y.png"}}], 400, "messages[0].content[0]", "scheme"),
])
def test_bad_image_400_names_the_part(client, content, status, where, words):
    e = error_of(lambda: client.chat.completions.create(model="mm", messages=[{"role": "user", "content": content}]))
    assert e.status_code == status and e.body["param"] == where and where in e.body["message"]
    assert words in e.body["message"]


def test_request_errors_400(client, server):
    e = error_of(lambda: client.chat.completions.create(model="text", messages=[user("hi")], max_tokens=10_000))
    assert e.status_code == 400 and e.body["param"] == "max_tokens" and "cap of 512" in e.body["message"]
    e = error_of(lambda: client.chat.completions.create(model="text", messages=[user("hi", data_url(png()))]))
    assert e.status_code == 400 and "'text' workflow takes no images" in e.body["message"]
    e = error_of(lambda: client.chat.completions.create(model="text", messages=[]))
    assert e.status_code == 400 and e.body["param"] == "messages"
    e = error_of(lambda: client.chat.completions.create(model="text", messages=[user("hi")], temperature=5))
    assert e.status_code == 400 and e.body["param"] == "temperature"
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.get(server.url + "/v1/nothing-here")
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_too_many_images_413(client):
    urls = [data_url(png())] * 9
    e = error_of(lambda: client.chat.completions.create(model="mm", messages=[user("hi", *urls)]))
    assert e.status_code == 413 and e.body["param"] == "messages[0].content[8]" and "at most 8" in e.body["message"]


@pytest.fixture
def decode_counter(monkeypatch):
    calls = {"b64decode": 0, "load_image": 0}

    def counted(name, fn):
        def wrapper(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapper

    monkeypatch.setattr(media, "b64decode", counted("b64decode", media.b64decode))
    monkeypatch.setattr(media, "load_image", counted("load_image", media.load_image))
    return calls


def test_50mb_data_url_refused_before_decoding(client, decode_counter):
    client.chat.completions.create(model="mm", messages=[user("hi", data_url(png()))], temperature=0, max_tokens=2)
    assert decode_counter == {"b64decode": 1, "load_image": 1}  # the counters see a real decode
    huge = "data:image/png;base64," + "A" * (50 * 1000 * 1000)
    e = error_of(lambda: client.chat.completions.create(model="mm", messages=[user("hi", huge)]))
    assert e.status_code == 413 and e.body["param"] == "messages[0].content[0]"
    assert "over the limit of 10,485,760 bytes" in e.body["message"]
    assert decode_counter == {"b64decode": 1, "load_image": 1}  # nothing more was decoded


# ------------------------------------------------------------------ what the server may touch
@pytest.fixture
def audit():
    """Records file opens and network calls made anywhere in this process while active."""
    events: list[tuple[str, tuple]] = []
    state = {"on": True}

    def hook(name, args):
        if state["on"] and (name == "open" or name.startswith(("socket.", "urllib."))):
            events.append((name, args))

    sys.addaudithook(hook)  # hooks cannot be removed: this one goes quiet after the test
    yield events
    state["on"] = False


def _opened(events, path) -> bool:
    return any(n == "open" and str(a[0]) == str(path) for n, a in events)


def test_remote_url_refused_without_network(server, audit):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)  # a new connection
    for url in ("http://example.com/cat.png", "https://203.0.113.7/x.png", "http://localhost.evil.test/x.png"):
        e = error_of(lambda: client.chat.completions.create(model="mm", messages=[user("hi", url)]))
        assert e.status_code == 400 and e.body["code"] == "media_not_allowed" and "not allowed" in e.body["message"]
    remote = [(n, a) for n, a in audit if n.startswith("urllib.") or
              (n == "socket.getaddrinfo" and a[0] not in ("127.0.0.1", "localhost")) or
              (n == "socket.connect" and isinstance(a[1], tuple) and a[1][0] not in ("127.0.0.1",))]
    assert remote == []
    assert any(n.startswith("socket.") for n, _ in audit)  # the hook does see the client's own connections


def test_local_paths_only_inside_allowed_dir(client, media_dirs, audit):
    inside, outside = media_dirs
    ok = client.chat.completions.create(model="mm", messages=[user("hi", str(inside / "ok.png"))], temperature=0,
                                        max_tokens=2)
    assert ok.usage.completion_tokens >= 1 and _opened(audit, inside / "ok.png")  # the hook sees real opens
    for ref in (str(outside / "secret.png"), "../outside/secret.png", "file://" + str(outside / "secret.png"),
                "link.png"):
        e = error_of(lambda: client.chat.completions.create(model="mm", messages=[user("hi", ref)]))
        assert e.status_code == 400 and e.body["code"] == "media_not_allowed", (ref, e.body)
        assert "outside the allowed media directory" in e.body["message"]
    assert not _opened(audit, outside / "secret.png")


def test_local_paths_refused_by_default(model, media_dirs, monkeypatch):
    """Without --allowed-local-media-path no path is even looked at (os.path is not consulted)."""
    touched = []
    for name in ("realpath", "exists", "isfile", "getsize"):
        fn = getattr(os.path, name)
        monkeypatch.setattr(os.path, name, lambda *a, _fn=fn, _n=name: touched.append((_n, a)) or _fn(*a))
    ref = media.ImageRef(str(media_dirs[1] / "secret.png"), "messages[0].content[0]")
    with pytest.raises(media.APIError) as info:
        media.load(ref, Limits())
    assert info.value.status == 400 and "not allowed" in info.value.message and touched == []


# ------------------------------------------------------------------ limits, queue, cancellation
@pytest.fixture(scope="module")
def small(model):
    """A server with small limits: 1 waiting request, 1 MiB bodies, 100 kB images, 64x64 pixels."""
    limits = Limits(max_queue=1, max_body_bytes=MIB, max_image_bytes=100_000, max_pixels=64 * 64)
    engine = Engine(model, max_batch_size=1, max_queue=1)
    with ServerThread(create_app(model, limits, engine=engine)) as s:
        s.engine = engine
        s.client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        yield s


def test_body_and_pixel_limits_413(small):
    c = small.client
    e = error_of(lambda: c.chat.completions.create(model="text", messages=[user("x" * (2 * MIB))]))
    assert e.status_code == 413 and "over the limit of 1,048,576 bytes" in e.body["message"]
    e = error_of(lambda: c.chat.completions.create(model="mm", messages=[user("hi", data_url(png(size=(80, 80))))]))
    assert e.status_code == 413 and e.body["param"] == "messages[0].content[0]" and "max_pixels=4,096" in e.body["message"]
    big = os.urandom(120_000)
    e = error_of(lambda: c.chat.completions.create(model="mm", messages=[user("hi", data_url(big))]))
    assert e.status_code == 413 and "over the limit of 100,000 bytes" in e.body["message"]


def test_queue_full_429(small, monkeypatch):
    engine, release, inner = small.engine, threading.Event(), small.engine._run
    monkeypatch.setattr(engine, "_run", lambda batch: (release.wait(30), inner(batch))[1])
    c = small.client
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(c.chat.completions.create, model="text", messages=[user("a")], max_tokens=2)
        wait_for(lambda: engine.status()["running"] == 1)
        waiting = pool.submit(c.chat.completions.create, model="text", messages=[user("b")], max_tokens=2)
        wait_for(lambda: engine.status()["queued"] == 1)
        e = error_of(lambda: c.chat.completions.create(model="text", messages=[user("c")], max_tokens=2))
        assert e.status_code == 429 and e.body["code"] == "queue_full" and "limit is 1" in e.body["message"]
        release.set()
        assert running.result().usage.completion_tokens >= 1 and waiting.result().usage.completion_tokens >= 1


def test_client_disconnect_cancels_the_request(client, server, model):
    """A streamed request whose client goes away stops decoding at once (finish reason 'cancelled', far
    fewer tokens than asked for); so does a non-streamed one that times out on the client side."""
    n = 100
    _, _, completion, _ = reference(model, "text", "tell me a long story", [], n)
    assert completion == n  # precondition: left alone it would run all n tokens (no eos)
    engine = server.engine
    stream = client.chat.completions.create(model="text", messages=[user("tell me a long story")], temperature=0,
                                            max_tokens=n, stream=True)
    next(iter(stream))
    next(iter(stream))
    stream.close()
    deadline = time.monotonic() + 20
    while not any(r == "cancelled" for _, r, _ in engine.finished_log) and time.monotonic() < deadline:
        time.sleep(0.02)
    cancelled = [t for _, r, t in engine.finished_log if r == "cancelled"]
    assert cancelled, f"the stream was not cancelled: {list(engine.finished_log)[-3:]}"
    assert cancelled[-1] < n

    # non-streamed: the client sends its request, the engine has it, the client hangs up
    before, batches = sum(r == "cancelled" for _, r, _ in engine.finished_log), engine.status()["batches"]
    held, inner = threading.Event(), engine._run
    engine._run = lambda batch: (held.wait(30), inner(batch))[1]  # the request waits in the worker
    try:
        body = json.dumps({"model": "text", "messages": [user("tell me a long story")], "temperature": 0,
                           "max_tokens": n}).encode()
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: " + str(len(body)).encode()
                     + b"\r\n\r\n" + body)
        deadline = time.monotonic() + 20
        while engine.status()["batches"] == batches and time.monotonic() < deadline:
            time.sleep(0.01)  # until the worker has taken it
        cancels = engine.status()["cancelled"]
        sock.close()
        deadline = time.monotonic() + 20
        while engine.status()["cancelled"] == cancels and time.monotonic() < deadline:
            time.sleep(0.02)  # until the server saw the disconnect (it polls every 0.25 s)
        held.set()  # now the worker goes on: the row stops before its first token
        while sum(r == "cancelled" for _, r, _ in engine.finished_log) == before and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        held.set()
        del engine._run
    assert sum(r == "cancelled" for _, r, _ in engine.finished_log) == before + 1
    assert engine.finished_log[-1][1:] == ("cancelled", 0)


def test_server_timeout_504_cancels(model):
    engine = Engine(model, max_batch_size=1)
    held, inner = threading.Event(), engine._run
    engine._run = lambda batch: (held.wait(30), inner(batch))[1]
    with ServerThread(create_app(model, Limits(request_timeout_s=0.5), engine=engine)) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=30)
        e = error_of(lambda: c.chat.completions.create(model="text", messages=[user("hi")], max_tokens=50))
        held.set()
        assert e.status_code == 504 and e.body["type"] == "timeout" and "cancelled" in e.body["message"]
        deadline = time.monotonic() + 20
        while not engine.finished_log and time.monotonic() < deadline:
            time.sleep(0.02)
        assert engine.finished_log[-1][1:] == ("cancelled", 0)


# ------------------------------------------------------------------ the engine without HTTP
def test_engine_is_fair_between_workflows_and_batches_match_alone(model, images):
    """Queued up front with batches of 2: the worker takes text, mm, xa in turn (none starves), a seeded
    sampled request runs alone, and every answer equals the same request alone."""
    def run(engine, specs):
        results: dict[int, list] = {}
        reqs = []
        for k, (task, prompt, imgs, sampling) in enumerate(specs):
            results[k] = []
            reqs.append(engine.prepare(task, prompt, imgs, sampling, results[k].append))
        for r in reqs:
            engine.submit(r)
        engine.start()
        deadline = time.monotonic() + 30
        while sum(bool(v) and isinstance(v[-1], Finished) for v in results.values()) < len(specs):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        engine.stop()
        return [("".join(e.text for e in v[:-1]), v[-1].completion_tokens) for v in results.values()]

    g = lambda n: Sampling(max_tokens=n)  # noqa: E731
    specs = [("mm", "<image>\nred?", [images[0]], g(6)), ("mm", "<image>\nblue?", [images[1]], g(8)),
             ("mm", "<image>\nany?", [images[2]], g(5)), ("mm", "<image>\nmore?", [images[0]], g(7)),
             ("text", "hello there", [], g(6)), ("text", "what is two", [], g(9)), ("text", "a b c", [], g(4)),
             ("xa", "<image> and <image>?", images[:2], g(6)),
             ("text", "seeded", [], Sampling(max_tokens=6, temperature=0.8, seed=3)),
             ("text", "seeded too", [], Sampling(max_tokens=6, temperature=0.8, seed=3))]
    batched = Engine(model, max_batch_size=2)
    together = run(batched, specs)
    assert list(batched.batch_log) == [("text", 2), ("mm", 2), ("xa", 1), ("text", 1), ("mm", 2), ("text", 1),
                                       ("text", 1)]
    alone = [run(Engine(model, max_batch_size=1), [s])[0] for s in specs]
    assert together == alone
    assert len(set(together)) >= len(specs) - 2  # mostly distinct answers: the comparison is not vacuous


# ------------------------------------------------------------------ the web page, in a real browser
def test_chat_page_streams_an_answer_in_chromium(client, server, tmp_path):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as e:
        print(f"skipping the browser test: playwright is not installed ({e})", file=sys.stderr)
        pytest.skip(f"playwright is not installed ({e})")
    browser_path = shutil.which("chromium") or (CHROMIUM if os.path.exists(CHROMIUM) else None)
    if browser_path is None:
        reason = "no chromium browser installed (apt-get update && apt-get install -y chromium)"
        print(f"skipping the browser test: {reason}", file=sys.stderr)
        pytest.skip(reason)
    image = tmp_path / "photo.png"
    image.write_bytes(png((200, 30, 30)))
    want = _request(client, "mm", "what is in the picture", [(200, 30, 30)], 12).choices[0].message.content
    assert want
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page()
            page.goto(server.url + "/")
            page.fill("#key", KEY)
            page.evaluate("loadModels()")  # again, now with the key
            page.wait_for_selector("body[data-ready='1']", timeout=15_000)
            assert page.eval_on_selector_all("#model option", "os => os.map(o => o.value)") == ["text", "mm", "xa"]
            page.select_option("#model", "mm")
            page.fill("#max_tokens", "12")
            page.set_input_files("#image", str(image))
            page.wait_for_selector("#preview:not([hidden])", timeout=10_000)
            page.fill("#prompt", "what is in the picture")
            page.click("#send")
            page.wait_for_selector(".assistant[data-done='1']", timeout=30_000)
            answer = page.text_content(".assistant")
            chunks = int(page.get_attribute(".assistant", "data-chunks"))
        finally:
            browser.close()
    assert answer == want and chunks >= 2
