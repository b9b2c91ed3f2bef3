"""`streammerge serve`: the scheduler against a fake runner, then the server started as a
subprocess on a free loopback port and spoken to with the official `openai` client (and httpx
for raw HTTP). References are independent: `export --variant ...` loaded in transformers and
its greedy generation, the same request sent alone, the OpenAI error shape.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import re
import subprocess
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

import serve_process
from streammerge.serve.scheduler import FINISHED, READY, ROUTING, RUNNING, QueueFull, Request, Sampling, Scheduler
from test_routing import TASKS, prompts_for, routers, run, stores  # noqa: F401 (fixtures reused)

CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


# ---- the scheduler, pure Python ---------------------------------------------------------------


def _req(prompt_len: int, max_tokens: int) -> Request:
    return Request(list(range(prompt_len)), Sampling(max_tokens=max_tokens), ("static",))


def test_scheduler_admits_within_rows_and_padded_kv_budget():
    # 10 bytes a token; budget 400: two rows of 20 reserved tokens (2 * 20 * 10) fit, three do not
    s = Scheduler(max_batch=3, kv_bytes_per_token=10, kv_budget=400, max_queue=2)
    a, b, c = _req(10, 10), _req(5, 15), _req(4, 4)
    for r in (a, b):
        s.submit(r)
    step = s.schedule(timeout=0)
    assert step.admitted == [a, b] and step.running == []
    for r in step.admitted:
        s.started(r)
    s.submit(c)  # 8 tokens, but the padded batch would be 3 rows x 20 = 600 bytes
    assert s.schedule(timeout=0).admitted == [] and s.load() == {"waiting": 1, "routing": 0, "running": 2}
    s.submit(_req(1, 1))
    with pytest.raises(QueueFull):
        s.submit(_req(1, 1))
    s.finish(a, "length")
    step = s.schedule(timeout=0)
    assert step.admitted == [c] and step.running == [b] and a.state == FINISHED and a.finish_reason == "length"
    assert not s.fits_alone(_req(30, 20)) and s.fits_alone(_req(20, 20))


def test_scheduler_abort_frees_the_slot():
    s = Scheduler(max_batch=1, kv_bytes_per_token=1)
    a, b = _req(3, 3), _req(3, 3)
    s.submit(a)
    s.submit(b)
    s.started(s.schedule(timeout=0).admitted[0])
    assert a.state == RUNNING and s.schedule(timeout=0).admitted == []
    s.abort(a)
    step = s.schedule(timeout=0)
    assert step.dropped == [a] and step.admitted == [b] and a.finish_reason == "abort"
    s.abort(b)  # routing: dropped at the next step even if it starts meanwhile
    s.started(b)
    assert s.schedule(timeout=0).dropped == [b] and s.load()["running"] == 0
    c = _req(1, 1)
    s.submit(c)
    s.abort(c)  # waiting: gone at once
    assert c.finish_reason == "abort" and s.load()["waiting"] == 0


def test_scheduler_routes_beside_the_steps():
    """A routed request goes to the router (take_routing), not into a step; while it is there
    it holds its row (max_batch), the engine's steps go on without it, and it joins the step
    after it is routed; one aborted while the router has it is not handed to a step."""
    s = Scheduler(max_batch=3, kv_bytes_per_token=1)
    static = _req(3, 3)
    routed = [Request([1, 2], Sampling(max_tokens=2), ("routed",)) for _ in range(3)]
    s.submit(static)
    s.submit(routed[0])
    s.submit(routed[1])
    step = s.schedule(timeout=0)
    assert step.admitted == [static] and routed[0].state == ROUTING and routed[1].state == ROUTING
    s.started(static)
    assert s.take_routing(timeout=0) == routed[:2] and s.take_routing(timeout=0) is None
    s.submit(routed[2])  # the batch is full: the static row and the two with the router
    step = s.schedule(timeout=0)
    assert step.admitted == [] and step.running == [static] and routed[2].state == "waiting"
    assert s.load() == {"waiting": 1, "routing": 2, "running": 1}
    s.abort(routed[1])  # gone while the router works on it
    s.routed(routed[:2])
    assert routed[0].state == READY
    step = s.schedule(timeout=0)
    assert step.admitted == [routed[0]] and step.dropped == [routed[1]] and routed[1].finish_reason == "abort"
    assert routed[2].state == ROUTING  # its slot came free with the abort
    s.started(routed[0])
    s.finish(static, "length")
    assert s.take_routing(timeout=0) == [routed[2]]
    assert s.schedule(timeout=0).admitted == []  # with the router: nothing for the engine yet
    s.routed([routed[2]])
    assert s.schedule(timeout=0).admitted == [routed[2]]


class _RoutingRunner:
    """A fake runner: each row's token is 1 (EOS 0 never comes), a decoding step takes 5 ms, and
    `route` waits until the engine has run 3 decoding steps since it began (so it only returns in
    time if the steps go on beside it), then fails a batch holding the prompt "poison"."""

    eos = {0}

    def __init__(self):
        from types import SimpleNamespace

        self.rows, self.routed_batches = [], []
        self.tokenizer = SimpleNamespace(decode=lambda toks, skip_special_tokens=True: "x" * len(toks))
        self._steps = 0
        self._cv = threading.Condition()

    def decide(self, reqs):  # as ModelRunner.decide: routes the routed requests not routed yet
        from streammerge.routing import STATIC

        self.route([r for r in reqs if r.target[0] == "routed" and r.decision is None])
        for r in reqs:
            if r.decision is None:
                r.decision = STATIC

    def route(self, reqs):
        from streammerge.routing import forced

        if not reqs:
            return
        with self._cv:
            begun = self._steps
            if not self._cv.wait_for(lambda: self._steps >= begun + 3, timeout=10):
                raise RuntimeError("no decoding step ran while routing")
        self.routed_batches.append(list(reqs))
        if any(r.features_text == "poison" for r in reqs):
            raise ValueError("bad features")  # the whole batch's forward fails
        for r in reqs:
            r.decision = forced("math", ["math", "code"])

    def prefill(self, reqs):
        self.rows += reqs
        return [1] * len(reqs)

    def decode(self, last):
        time.sleep(0.005)
        with self._cv:
            self._steps += 1
            self._cv.notify_all()
        return [1] * len(self.rows)

    def remove(self, reqs):
        self.rows = [r for r in self.rows if r not in reqs]

    def resident_bytes(self):
        return {}


def test_engine_routes_beside_the_decoding_steps():
    """The engine's router thread routes while the engine thread decodes the running batch: a
    routed request's routing forward overlaps the running request's steps (the fake router
    returns only once steps ran meanwhile); a routing batch that fails is routed again request
    by request, the request at fault finishes with an error event, the others are served, and
    the engine goes on."""
    from streammerge.serve.engine import Engine

    runner = _RoutingRunner()
    engine = Engine(runner, Scheduler(max_batch=8, kv_bytes_per_token=1))
    engine.start()
    try:
        events: dict[str, list] = {}

        def submit(name, target, text="", max_tokens=400):
            done = threading.Event()
            events[name] = []

            def emit(e):
                events[name].append(e)
                if e[0] in ("done", "error"):
                    done.set()
            engine.submit(Request([1], Sampling(max_tokens=max_tokens), target, features_text=text, emit=emit))
            return done

        long_static = submit("static", ("static",))
        with engine.scheduler._cv:  # both arrive before the router looks: one routing batch
            poisoned = submit("poison", ("routed",), "poison")
            beside = submit("beside", ("routed",), "fine", max_tokens=5)
        assert poisoned.wait(10) and events["poison"][-1][0] == "error"
        assert "ValueError: bad features" in events["poison"][-1][1]
        assert beside.wait(10) and events["beside"][-1][:2] == ("done", "length")  # retried alone: served
        routed = submit("routed", ("routed",), "fine", max_tokens=5)
        assert routed.wait(10)
        assert events["routed"][0][0] == "routing" and events["routed"][0][1].task == "math"
        assert events["routed"][-1][:2] == ("done", "length")
        assert not long_static.is_set()  # it decoded all along, and goes on
        assert long_static.wait(20) and events["static"][-1][:2] == ("done", "length") and engine.alive
        assert [len(b) for b in runner.routed_batches] == [2, 1, 1, 1]
    finally:
        engine.stop()
    assert not engine.alive


# ---- the server -------------------------------------------------------------------------------


# The servers run on the CPU (CI); on a GPU machine STREAMMERGE_TEST_SERVE_DEVICE=cuda runs the
# `server` fixture's on the GPU, for the tests that hold on any device (those that compare
# answers with each other, not with CPU float32 references: concurrency, streaming).
SERVER_DEVICE = os.environ.get("STREAMMERGE_TEST_SERVE_DEVICE", "cpu")


def serve_command(store: Path, *args) -> tuple[list[str], dict]:
    return serve_process.serve_command(store, "--device", "cpu", *args)


class Server(serve_process.ServeProcess):
    def __init__(self, store: Path, log: Path, *args, device: str = "cpu"):
        super().__init__(store, "--device", device, *args, log=log, timeout=90)

    def client(self, key: str = "none", **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base + "/v1", api_key=key, max_retries=0, timeout=60, **kw)

    def metrics(self, **headers) -> str:
        return httpx.get(self.base + "/metrics", headers=headers).text


@pytest.fixture(scope="module")
def store(stores, routers):
    """The Mediator store (router fitted), its base tokenizer given a chat template."""
    s = stores["mediator"]
    p = s / "hf" / "tokenizer_config.json"
    cfg = json.loads(p.read_text())
    cfg["chat_template"] = CHAT_TEMPLATE
    p.write_text(json.dumps(cfg))
    return s


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    srv = Server(store, tmp_path_factory.mktemp("srv") / "log", "--name", "job", "--max-batch", "32", device=SERVER_DEVICE)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def tokenizer(store):
    from streammerge.routing.runtime import load_tokenizer
    from streammerge.store.store import Store

    return load_tokenizer(Store.open(store))


@pytest.fixture(scope="module")
def exports(store, tmp_path_factory):
    """variant -> the exported model loaded in transformers (float32), exported once."""
    from transformers import AutoModelForCausalLM

    root, cache = tmp_path_factory.mktemp("exports"), {}

    def get(variant: str):
        if variant not in cache:
            out = root / variant.replace(":", "_")
            run("export", store, out, "--variant", variant)
            cache[variant] = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
        return cache[variant]

    return get


def greedy_text(model, tokenizer, ids: list[int], n: int) -> tuple[str, int]:
    """transformers' greedy generation: (text up to EOS, tokens generated counting EOS)."""
    x = torch.tensor([ids])
    with torch.inference_mode():
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)[0, len(ids):].tolist()
    eos = [j for j, t in enumerate(out) if t == tokenizer.eos_token_id]
    cut = eos[0] if eos else len(out)
    return tokenizer.decode(out[:cut], skip_special_tokens=True), cut + bool(eos)


def test_forced_and_static_equal_the_exported_models(server, tokenizer, exports):
    """job:task:k greedy == `export --variant task:k` in transformers, greedy (same text, same
    token count); job:static == `--variant merged`; completions and chat alike."""
    c = server.client()
    for variant, model in [("task:math", "job:task:math"), ("task:code", "job:task:code"), ("merged", "job:static")]:
        ref = exports(variant)
        prompt = prompts_for("math", 1, 7)[0]
        r = c.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)
        want, n = greedy_text(ref, tokenizer, tokenizer(prompt)["input_ids"], 12)
        assert r.choices[0].text == want and r.usage.completion_tokens == n, (variant, r.choices[0].text, want)
        assert r.choices[0].finish_reason == ("length" if n == 12 and want else "stop")
        routing = r.model_extra["routing"]
        assert routing["mode"] == ("static" if variant == "merged" else "forced")
        assert routing["task"] == (None if variant == "merged" else variant.split(":")[1])

        msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": prompt}]
        r = c.chat.completions.create(model=model, messages=msgs, max_tokens=10, temperature=0)
        ids = tokenizer(tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False),
                        add_special_tokens=False)["input_ids"]
        want, n = greedy_text(ref, tokenizer, ids, 10)
        assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant", variant
        assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == n


def test_compute_threads_leave_a_core_to_the_front_end():
    import os

    from streammerge.serve.server import set_compute_threads

    before = torch.get_num_threads()
    try:
        cpus = len(os.sched_getaffinity(0))
        line = set_compute_threads("auto", torch.device("cpu"))
        assert torch.get_num_threads() == max(1, min(before, cpus - 1)), line
        torch.set_num_threads(before)
        set_compute_threads("auto", torch.device("cuda", 0))  # a GPU server keeps torch's own count
        assert torch.get_num_threads() == before
        assert set_compute_threads(1, torch.device("cpu")) == "1 compute thread(s)" and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    out = run("serve", "/nonexistent.zarr", "--threads", "0", expect=2)
    assert "at least 1" in out


def test_models_and_routed_requests(server):
    # serve's default budget: chosen at start-up from the free memory, and said
    assert re.search(r"memory budget auto: [0-9.]+ GiB = the model", server.log.read_text()), server.log.read_text()
    # the device and its threads, said at start-up: a CPU server's compute threads, a GPU server's CPU threads
    said = r"\(cpu, [0-9]+ compute thread" if SERVER_DEVICE == "cpu" else rf"\({SERVER_DEVICE}[:0-9]*, [0-9]+ CPU thread"
    assert re.search(said, server.log.read_text()), server.log.read_text()
    c = server.client()
    ids = [m.id for m in c.models.list().data]
    assert ids == ["job", "job:static"] + [f"job:task:{t}" for t in TASKS]
    assert [c.models.retrieve(m).id for m in ids] == ids
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("job:task:poetry")
    for t in TASKS:
        r = c.completions.create(model="job", prompt=prompts_for(t, 1, 11)[0], max_tokens=3, temperature=0)
        routing = r.model_extra["routing"]
        assert routing["mode"] in ("top1", "mix") and set(routing["probs"]) == set(TASKS)
        assert abs(sum(routing["probs"].values()) - 1) < 1e-6 and 0 <= routing["entropy"] <= 1
        assert max(routing["probs"], key=routing["probs"].get) == t and t in routing["applied"]


def test_streaming_equals_the_whole_answer(server):
    c = server.client()
    prompt = prompts_for("code", 1, 5)[0]
    whole = c.completions.create(model="job", prompt=prompt, max_tokens=15, temperature=0)
    chunks = list(c.completions.create(model="job", prompt=prompt, max_tokens=15, temperature=0, stream=True,
                                       stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == whole.choices[0].text
    assert chunks[0].model_extra["routing"] == whole.model_extra["routing"]
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    msgs = [{"role": "user", "content": prompt}]
    whole = c.chat.completions.create(model="job", messages=msgs, max_tokens=9, temperature=0)
    deltas = [ch.choices[0].delta for ch in c.chat.completions.create(model="job", messages=msgs, max_tokens=9,
                                                                       temperature=0, stream=True)]
    assert deltas[0].role == "assistant" and "".join(d.content or "" for d in deltas) == whole.choices[0].message.content
    with httpx.stream("POST", server.base + "/v1/completions", json={"model": "job", "prompt": "abc", "max_tokens": 2,
                                                                      "stream": True}) as resp:
        lines = [x for x in resp.iter_lines() if x]
    assert resp.headers["content-type"].startswith("text/event-stream") and lines[-1] == "data: [DONE]"


def test_sampling_stop_and_seed(server, tokenizer, exports):
    c = server.client()
    prompt = prompts_for("chat", 1, 3)[0]
    greedy = c.completions.create(model="job:task:chat", prompt=prompt, max_tokens=12, temperature=0).choices[0].text
    assert len(greedy) > 4
    stop = greedy[3:5]
    r = c.completions.create(model="job:task:chat", prompt=prompt, max_tokens=12, temperature=0, stop=[stop, "never"])
    assert r.choices[0].text == greedy[: greedy.index(stop)] and r.choices[0].finish_reason == "stop"
    streamed = c.completions.create(model="job:task:chat", prompt=prompt, max_tokens=12, temperature=0, stop=stop, stream=True)
    assert "".join(ch.choices[0].text for ch in streamed) == greedy[: greedy.index(stop)]
    # a nucleus smaller than the top token's probability is greedy whatever the temperature
    r = c.completions.create(model="job:task:chat", prompt=prompt, max_tokens=12, temperature=1.5, top_p=1e-6, seed=1)
    assert r.choices[0].text == greedy
    a, b = (c.completions.create(model="job:task:chat", prompt=prompt, max_tokens=12, temperature=1.0, seed=42).choices[0].text
            for _ in range(2))
    others = {c.completions.create(model="job:task:chat", prompt=prompt, max_tokens=12, temperature=1.0, seed=s).choices[0].text
              for s in range(2)}
    assert a == b and len(others) > 1  # a seed gives the same tokens; other seeds differ


def _error(resp: httpx.Response, status: int, param=None) -> dict:
    assert resp.status_code == status, (resp.status_code, resp.text)
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str) and err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


def test_bad_input_table(server):
    url = server.base + "/v1/completions"
    chat = server.base + "/v1/chat/completions"
    ok = {"model": "job:static", "prompt": "abc", "max_tokens": 2}
    long_prompt = "a b " * 1200  # > 2048 tokens
    cases = [
        (url, b'{"model": "job", "prompt": ', 400, None),  # malformed JSON
        (url, b"[1, 2]", 400, None),  # not an object
        (url, {**ok, "model": "nope"}, 404, "model"),
        (url, {**ok, "model": "job:task:poetry"}, 404, "model"),
        (url, {**ok, "max_tokens": "5"}, 400, "max_tokens"),
        (url, {**ok, "temperature": "hot"}, 400, "temperature"),
        (url, {**ok, "stream": "yes"}, 400, "stream"),
        (url, {**ok, "prompt": 5}, 400, "prompt"),
        (url, {k: v for k, v in ok.items() if k != "prompt"}, 400, "prompt"),
        (url, {**ok, "max_tokens": 0}, 400, "max_tokens"),
        (url, {**ok, "top_p": 0}, 400, "top_p"),
        (url, {**ok, "n": 2}, 400, "n"),
        (url, {**ok, "prompt": [1, 99999]}, 400, "prompt"),
        (url, {**ok, "prompt": long_prompt}, 400, "prompt"),
        (url, {**ok, "max_tokens": 5000}, 400, "max_tokens"),
        # beyond what a torch.Generator takes (a 500 from the prefill before)
        (url, {**ok, "seed": 2**64, "temperature": 1}, 400, "seed"),
        (url, {**ok, "seed": -(2**63) - 1, "temperature": 1}, 400, "seed"),
        (url, {**ok, "stream": True, "stream_options": {"include_usage": "x"}}, 400, "stream_options"),
        (chat, {"model": "job", "messages": "hi"}, 400, "messages"),
        (chat, {"model": "job", "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
        (chat, {"model": "job", "messages": []}, 400, "messages"),
        (url, b'{"model": "job", "prompt": "' + b"a" * 4_000_000 + b'"}', 413, None),
        (url, b'{"model": "job", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, None),  # nesting bomb
    ]
    for target, body, status, param in cases:
        kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
        _error(httpx.post(target, timeout=30, **kw), status, param)
    # a route or method that does not exist answers in the same shape
    assert "/v1/embeddings" in _error(httpx.post(server.base + "/v1/embeddings", json=ok, timeout=30), 404)["message"]
    assert "GET" in _error(httpx.get(url, timeout=30), 405)["message"]
    # the official client sees the same as exceptions of the matching class
    c = server.client()
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="job", prompt=long_prompt, max_tokens=1)
    assert e.value.code == "context_length_exceeded"
    assert c.completions.create(**ok).choices[0].text is not None  # still serving
    for seed in (2**64 - 1, -(2**63)):  # the ends of the range are served
        assert httpx.post(url, json={**ok, "seed": seed, "temperature": 1}, timeout=30).status_code == 200


def test_serve_command_errors(store, tmp_path):
    """Bad options end in one line and exit 1, before anything listens."""
    for args, msg in [(["--memory-budget", "10KB"], "memory budget 10000 bytes: the model and the encodings alone take"),
                      (["--name", "a:b"], "--name 'a:b': a model name has no ':'")]:
        cmd, env = serve_command(store, "--port", serve_process.free_port(), *args)
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert res.returncode == 1 and res.stderr.startswith(f"error: {msg}") and res.stderr.count("\n") == 1, res.stderr
    cmd, env = serve_command(tmp_path / "missing.zarr")
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, res.stderr
    cmd, env = serve_command(store, "--memory-budget", "lots")  # click's usage error
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "'lots' is not a size" in res.stderr, res.stderr


def test_memory_budget_bounds_the_kv_cache(store, tmp_path):
    """--memory-budget 3MB: the tiny model + encodings take ~0.8 MB, half of the rest (~1.1 MB,
    1 KiB a token) is the KV cache's: a request reserving 1500 tokens is refused, 5 run."""
    srv = Server(store, tmp_path / "log", "--memory-budget", "3MB")
    try:
        r = httpx.post(srv.base + "/v1/completions", json={"model": "med:static", "prompt": "abc", "max_tokens": 1500})
        assert "memory budget" in _error(r, 400, "max_tokens")["message"]
        ok = srv.client().completions.create(model="med:task:code", prompt="abc", max_tokens=5, temperature=0)
        assert ok.usage.completion_tokens >= 1
        assert 'streammerge_resident_bytes{part="cache"}' in srv.metrics()
    finally:
        srv.stop()


def test_api_key_capacity_and_disconnect(store, tmp_path):
    """--api-key; beyond --max-batch + --max-queue a 429 with Retry-After; a client gone
    mid-stream frees its slot (the queued request then completes); /metrics counts it."""
    srv = Server(store, tmp_path / "log", "--api-key", "sekret", "--max-batch", "1", "--max-queue", "1")
    try:
        with pytest.raises(openai.AuthenticationError):
            srv.client("wrong").models.list()
        assert httpx.get(srv.base + "/v1/models").status_code == 401
        assert httpx.get(srv.base + "/health").status_code == 200  # open, for load balancers
        c = srv.client("sekret")
        assert [m.id for m in c.models.list().data][:2] == ["med", "med:static"]  # the default name
        # one running (a long stream), one waiting, the third refused
        long = {"model": "med:static", "prompt": "abc", "max_tokens": 2000, "temperature": 0, "stream": True}
        h = {"Authorization": "Bearer sekret"}
        with httpx.Client(timeout=60) as http:
            first = http.send(http.build_request("POST", srv.base + "/v1/completions", json=long, headers=h), stream=True)
            lines = first.iter_lines()
            assert next(lines).startswith("data: ")  # running
            with cf.ThreadPoolExecutor(1) as pool:
                queued = pool.submit(c.completions.create, model="med:task:math", prompt="abc", max_tokens=3, temperature=0)
                deadline = time.monotonic() + 30
                while 'streammerge_requests{state="waiting"} 1' not in srv.metrics(**h):
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
                refused = http.post(srv.base + "/v1/completions", json={**long, "stream": False}, headers=h)
                err = _error(refused, 429)
                assert err["type"] == "rate_limit_error" and int(refused.headers["retry-after"]) >= 1
                assert not queued.done()
                first.close()  # the client goes away mid-stream
                assert queued.result(timeout=30).choices[0].finish_reason == "length"
        m = srv.metrics(**h)
        assert 'streammerge_requests_total{outcome="abort"} 1' in m
        assert 'streammerge_decisions_total{mode="forced",task="math"} 1' in m
        assert "streammerge_resident_bytes{part=" in m and "streammerge_batch_size_bucket" in m
    finally:
        srv.stop()


def test_concurrent_mixed_requests_equal_each_alone(server):
    """>= 16 simultaneous requests over 3 tasks, forced and routed, decode in shared batches
    whatever their decisions; each answer (greedy) equals the same request sent alone."""
    c = server.client()
    jobs = []
    for i in range(16):
        t = TASKS[i % 3]
        model = "job" if i % 2 else f"job:task:{TASKS[(i + 1) % 3]}"
        jobs.append(dict(model=model, prompt=prompts_for(t, 1, 100 + i)[0], max_tokens=4 + i % 3, temperature=0))
    alone = [c.completions.create(**j) for j in jobs]
    before = server.metrics()
    with cf.ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda j: c.completions.create(**j), jobs))
    for a, b, j in zip(alone, together, jobs):
        assert (b.choices[0].text, b.choices[0].finish_reason) == (a.choices[0].text, a.choices[0].finish_reason), j
        ra, rb = a.model_extra["routing"], b.model_extra["routing"]
        assert {k: ra[k] for k in ("mode", "task", "applied")} == {k: rb[k] for k in ("mode", "task", "applied")}, j
        # router features batched with others: the same up to float rounding
        assert ra.get("probs") == rb.get("probs") or all(abs(ra["probs"][t] - rb["probs"][t]) < 1e-6 for t in TASKS)
    tasks = {b.model_extra["routing"]["task"] for b in together}
    assert set(TASKS) <= tasks
    after = server.metrics()
    # some decode steps ran 8 or more rows together, some with 3 or more decisions
    assert _steps(after, "batch_size", 8) > _steps(before, "batch_size", 8)
    assert _steps(after, "batch_decisions", 3) > _steps(before, "batch_decisions", 3)
    # each request prefilled once, some of them together (one routing forward and one prefill)
    prefilled = _metric(after, "streammerge_prefill_size_sum") - _metric(before, "streammerge_prefill_size_sum")
    prefills = _metric(after, "streammerge_prefill_size_count") - _metric(before, "streammerge_prefill_size_count")
    assert prefilled == len(jobs) and 1 <= prefills < len(jobs)


def _metric(text: str, name: str) -> float:
    return next(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.split(" ")[0] == name)


def _steps(text: str, histogram: str, min_size: int) -> int:
    """Decode steps whose streammerge_<histogram> was at least min_size, from /metrics' text."""
    counts = {}
    for line in text.splitlines():
        if line.startswith(f"streammerge_{histogram}_bucket"):
            le = line.split('le="')[1].split('"')[0]
            counts[le] = float(line.rsplit(" ", 1)[1])
    below = max((v for k, v in counts.items() if k != "+Inf" and float(k) < min_size), default=0)
    return int(counts.get("+Inf", 0) - below)


def test_1bit_store_served(stores, routers, tokenizer, tmp_path):
    """A 1bit store (lambda 0.8: theta_0 + tau_k + lambda * TIES(others)): forced greedy ==
    `export --variant task:k`, static == `--variant merged`, and a concurrent mixed batch equals
    each request alone."""
    from transformers import AutoModelForCausalLM

    store = stores["1bit"]
    # --fused always: every routed Linear runs the stacked product (CUDA's decoding path) on CPU,
    # served end to end; the budget holds every stack
    srv = Server(store, tmp_path / "log", "--name", "bit", "--fused", "always", "--memory-budget", "1GB")
    try:
        stacked = re.search(r"fused always: (\d+) of (\d+) routed linear layers stacked", srv.log.read_text())
        assert stacked and int(stacked[1]) == int(stacked[2]) > 0, srv.log.read_text()
        c = srv.client()
        prompt = prompts_for("code", 1, 9)[0]
        ids = tokenizer(prompt)["input_ids"]
        for variant, model in [("task:code", "bit:task:code"), ("merged", "bit:static")]:
            run("export", store, tmp_path / variant.replace(":", "_"), "--variant", variant)
            ref = AutoModelForCausalLM.from_pretrained(str(tmp_path / variant.replace(":", "_")), dtype=torch.float32).eval()
            r = c.completions.create(model=model, prompt=prompt, max_tokens=6, temperature=0)
            want, n = greedy_text(ref, tokenizer, ids, 6)
            assert (r.choices[0].text, r.usage.completion_tokens) == (want, n), variant
        jobs = [dict(model=m, prompt=prompts_for(t, 1, 30 + i)[0], max_tokens=4, temperature=0)
                for i, (t, m) in enumerate([("chat", "bit"), ("math", "bit"), ("code", "bit:task:code")])]
        alone = [c.completions.create(**j).choices[0].text for j in jobs]
        with cf.ThreadPoolExecutor(len(jobs)) as pool:
            together = list(pool.map(lambda j: c.completions.create(**j).choices[0].text, jobs))
        assert together == alone
    finally:
        srv.stop()


def test_int8_store_served(stores, tokenizer, tmp_path):
    """A Mediator store with int8 values (`value_bits: 8`) served with a budget: forced greedy ==
    `export --variant task:k` in transformers; /metrics reports the resident parts, the row plan
    among them, and the encodings the in-process runtime holds: the int8 codes as stored."""
    import yaml
    from transformers import AutoModelForCausalLM

    from helpers import write_recipe
    from streammerge.routing.deltas import DeltaRuntime
    from streammerge.routing.encoded import Int8Values
    from streammerge.routing.runtime import load_merged_model, open_routing_store

    r = yaml.safe_load((stores["root"] / "med.yaml").read_text())
    r["parameters"].update(rho=0.5, value_bits=8)
    store = tmp_path / "med8.zarr"
    run("build", write_recipe(tmp_path / "med8.yaml", r), "--store", store, "--block-elements", "1000")
    run("export", store, tmp_path / "math", "--variant", "task:math")
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path / "math"), dtype=torch.float32).eval()
    s, method = open_routing_store(store)
    model, _ = load_merged_model(s, torch.device("cpu"), torch.float32)
    rt = DeltaRuntime(model, s, method, torch.device("cpu"), torch.float32)
    assert all(isinstance(e.value, Int8Values) for t in rt.tensors.values() for e in t.experts.values())
    srv = Server(store, tmp_path / "log", "--name", "m8", "--max-batch", "4", "--memory-budget", "1GB")
    try:
        prompt = prompts_for("math", 1, 11)[0]
        out = srv.client().completions.create(model="m8:task:math", prompt=prompt, max_tokens=8, temperature=0)
        want, n = greedy_text(ref, tokenizer, tokenizer(prompt)["input_ids"], 8)
        assert (out.choices[0].text, out.usage.completion_tokens) == (want, n)
        parts = {m[1]: float(m[2]) for m in re.finditer(r'streammerge_resident_bytes\{part="(\w+)"\} (\S+)', srv.metrics())}
        assert set(parts) == {"model", "encodings", "plan", "cache", "kv_cache"}, parts
        assert parts["encodings"] == rt.resident_bytes()["encodings"]
    finally:
        srv.stop()
