"""ifp serve as a client sees it: a real server process, driven by the official openai client.

One server for the module (SmolLM2 at keep 0.5 on loopback); every request
asks for a few tokens, since the CPU generates about 10-20 a second.
"""

import asyncio
import json
import threading
import time
from pathlib import Path

import openai
import pytest
from openai import OpenAI

import mlx.core as mx

from ifp_mlx.errors import IFPError
from ifp_mlx.model.masks import save_mask
from ifp_mlx.select.base import top_k
from ifp_mlx.serve.protocol import APIError, Limits, parse_chat
from ifp_mlx.serve.stops import StopWatch
from ifp_mlx.serve.responses import error_response
from ifp_mlx.serve.worker import RETRY_AFTER, Settings, Worker
from serving import assert_error, get, post, raw, running_server

MAX_BODY_KB = 64


@pytest.fixture(scope="module")
def server(smollm2_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "stderr.txt"
    args = ["-m", str(smollm2_dir), "--keep", "0.5", "--log-level", "warning", "--max-body-kb", str(MAX_BODY_KB), "--predictor", str(SHIPPED)]
    with running_server(args, log) as (base, port):
        yield base, port


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=f"{server[0]}/v1", api_key="x", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


def ask(client, model, content, **options):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}], **options)


def test_models_and_health(server, client, model):
    assert model == "smollm2-f32"
    assert client.models.retrieve(model).id == model
    assert get(f"{server[0]}/health")["status"] == "ok"


def test_plain_chat_reports_usage_and_the_submodel(client, model):
    response = ask(client, model, "What is the capital of France?", max_tokens=6)
    choice = response.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("length", "stop")
    usage = response.usage
    assert usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= 6
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details.cached_tokens == 0
    assert response.model_extra["ifp"]["k"] == 768  # the server's --keep 0.5 of 1536


def test_streamed_chat_with_usage_equals_the_plain_reply(client, model):
    question = "Name a large animal."
    plain = ask(client, model, question, max_tokens=6).choices[0].message.content
    chunks = list(ask(client, model, question, max_tokens=6, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain  # greedy, and the cached conversation's KV changes no token
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0  # the same opening turn, from the cache
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_second_turn_reuses_the_conversations_kv(client, model):
    messages = [{"role": "user", "content": "Tell me about the moon."}]
    first = client.chat.completions.create(model=model, messages=messages, max_tokens=6)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    messages += [{"role": "assistant", "content": first.choices[0].message.content}, {"role": "user", "content": "And the sun?"}]
    second = client.chat.completions.create(model=model, messages=messages, max_tokens=4)
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens


def test_completions_use_the_raw_prompt(client, model):
    response = client.completions.create(model=model, prompt="The capital of France is", max_tokens=5)
    assert response.object == "text_completion" and response.choices[0].text
    assert response.usage.prompt_tokens < 10  # no chat template around it
    streamed = "".join(c.choices[0].text for c in client.completions.create(model=model, prompt="The capital of France is", max_tokens=5, stream=True) if c.choices)
    assert streamed == response.choices[0].text


def test_seeded_sampling_repeats(client, model):
    replies = {ask(client, model, "Tell me a joke.", max_tokens=6, temperature=1.0, top_p=0.9, seed=3).choices[0].message.content for _ in range(2)}
    assert len(replies) == 1


def test_stop_ends_the_reply_before_the_stop_string(client, model):
    prompt = "Count: one, two, three, four, five,"
    full = client.completions.create(model=model, prompt=prompt, max_tokens=10).choices[0].text
    stop = full.strip()[len(full.strip()) // 2 :][:3]
    assert stop.strip(), full
    expected = full[: full.find(stop)]
    stopped = client.completions.create(model=model, prompt=prompt, max_tokens=10, stop=stop)
    assert stopped.choices[0].text == expected and stopped.choices[0].finish_reason == "stop"
    chunks = client.completions.create(model=model, prompt=prompt, max_tokens=10, stop=[stop, "never"], stream=True)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected


def test_stop_watch_holds_back_a_split_stop_string():
    watch = StopWatch(["</end>", "xyz"])
    assert watch.feed("abc</e") == "abc"
    assert watch.feed("nd>tail") == "" and watch.stopped
    other = StopWatch(["xyz"])
    assert other.feed("ax") == "a" and other.feed("a") == "xa" and other.flush() == ""


def test_ifp_fields_choose_the_submodel(client, model):
    quarter = ask(client, model, "Hello!", max_tokens=2, extra_body={"keep": 0.25})
    assert quarter.model_extra["ifp"]["k"] == 384
    activations = ask(client, model, "Hello!", max_tokens=2, extra_body={"selector": "activations"})
    assert activations.model_extra["ifp"]["selector"] == "activations"
    dense = ask(client, model, "Hello!", max_tokens=2, extra_body={"selector": "dense"})
    assert dense.model_extra["ifp"]["k"] == 1536
    task = ask(client, model, "Where is Paris?", max_tokens=2, extra_body={"task": "Answer questions about geography."})
    assert task.choices[0].message.content is not None
    messages = [{"role": "user", "content": "Write about the sea."}]
    first = client.chat.completions.create(model=model, messages=messages, max_tokens=3)
    messages += [{"role": "assistant", "content": first.choices[0].message.content}, {"role": "user", "content": "Now 2+2?"}]
    again = client.chat.completions.create(model=model, messages=messages, max_tokens=2, extra_body={"reselect": True})
    assert again.usage.prompt_tokens_details.cached_tokens == 0  # a new mask: the turns are processed again


def test_bad_requests_get_json_errors_and_the_server_keeps_serving(server, client, model):
    port = server[1]
    chat = "/v1/chat/completions"
    user = [{"role": "user", "content": "hi"}]
    assert_error(*post(port, chat, b'{"messages": [oops'), 400)
    assert_error(*post(port, chat, json.dumps({"model": model}).encode()), 400, "messages")
    assert_error(*post(port, chat, json.dumps({"model": model, "messages": "hi"}).encode()), 400, "messages")
    assert_error(*post(port, "/v1/completions", json.dumps({"model": model}).encode()), 400, "prompt")
    cases = [
        ({"max_tokens": -1}, "max_tokens"), ({"max_tokens": 10**6}, "max_tokens"),
        ({"keep": 0}, "keep"), ({"keep": 1.5}, "keep"), ({"selector": "nope"}, "selector"),
        ({"temperature": -1}, "temperature"), ({"stop": 3}, "stop"),
    ]
    for fields, param in cases:
        assert_error(*post(port, chat, json.dumps({"model": model, "messages": user, **fields}).encode()), 400, param)
    long = [{"role": "user", "content": "hello " * 9000}]  # over the 8192-token context
    assert_error(*post(port, chat, json.dumps({"model": model, "messages": long}).encode()), 400, "messages")
    with pytest.raises(openai.NotFoundError) as e:
        ask(client, "gpt-4", "hi", max_tokens=2)
    assert e.value.status_code == 404 and e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError):
        ask(client, model, "hi", max_tokens=2, extra_body={"keep": 2})
    assert_error(*raw(port, "GET /v1/nowhere HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"), 404)
    assert_error(*raw(port, "GET /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"), 405)
    assert ask(client, model, "Still there?", max_tokens=2).choices[0].message.content is not None


def test_a_body_over_the_limit_is_refused_before_it_is_read(server, client, model):
    port, limit = server[1], MAX_BODY_KB << 10
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {limit + 1}\r\n\r\n"
    assert_error(*raw(port, head, b'{"messages": '), 413)  # refused on the header: the rest is never sent
    chunk = b'"' + b"x" * 8190 + b'"'
    chunked = "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(limit // len(chunk) + 1))  # no final chunk
    assert_error(*raw(port, chunked, body), 413)
    assert ask(client, model, "Still there?", max_tokens=2).choices[0].message.content is not None


def test_a_client_that_disconnects_frees_its_place(server, client, model):
    health = f"{server[0]}/health"
    before = get(health)["cancelled"]
    impatient = OpenAI(base_url=f"{server[0]}/v1", api_key="x", max_retries=0, timeout=2)
    long = "Write a very long story about a dragon."
    with ask(client, model, long, max_tokens=4000, stream=True) as stream:
        chunks = iter(stream)
        next(chunks)
        with pytest.raises(openai.APITimeoutError):
            ask(impatient, model, long, max_tokens=4000)  # gives up while waiting behind the stream
        next(chunks)
    # leaving the block closed the stream mid-reply
    with pytest.raises(openai.APITimeoutError):
        ask(impatient, model, "Write a very long story about a castle.", max_tokens=4000)  # gives up while it runs
    start = time.monotonic()
    assert ask(client, model, "Quick?", max_tokens=2).choices[0].message.content is not None
    assert time.monotonic() - start < 30  # the 4000-token replies were stopped, not finished
    assert get(health)["cancelled"] == before + 3 and get(health)["waiting"] == 0


def test_concurrent_requests_wait_their_turn(client, model):
    answers, errors = [], []

    def one(i: int) -> None:
        try:
            answers.append(ask(client, model, f"Say the number {i}.", max_tokens=3).choices[0].message.content)
        except Exception as e:  # any failure is the test's to report
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == [] and len(answers) == 3


def test_a_full_queue_answers_503(tmp_path):
    limits = Limits(("m",), 100)
    worker = Worker(Settings(tmp_path, limits, queue=1))  # not started: nothing takes jobs off the queue
    loop = asyncio.new_event_loop()
    try:
        ask_ = parse_chat({"messages": [{"role": "user", "content": "hi"}]}, limits)
        worker.submit(ask_, loop)
        with pytest.raises(APIError) as e:
            worker.submit(ask_, loop)
        assert e.value.status == 503 and worker.waiting == 1
        assert error_response(e.value).headers["retry-after"] == e.value.headers["Retry-After"] == RETRY_AFTER
    finally:
        loop.close()


SHIPPED = Path(__file__).parent.parent / "ifp_mlx" / "predictors" / "smollm2-135m"


def test_the_servers_mask_and_predictor_go_to_their_selectors(smollm2, smollm2_dir, tmp_path):
    """--mask and --predictor reach the static and predictor selectors (a mask alone
    makes static the default); no selector named and the default's name share one
    engine; a bad file stops the server's start with its one-line error."""
    indices = top_k(mx.random.uniform(shape=(smollm2.num_layers, smollm2.d_ff)), 200)
    mask = save_mask(tmp_path / "m.safetensors", indices, smollm2.config)
    worker = Worker(Settings(smollm2_dir, Limits(("m",), 2048), mask=mask, predictor=SHIPPED))
    worker.loaded = smollm2  # the worker thread's model, loaded by the test instead
    static = worker._engine(None, None)
    assert static.selector.name == "static" and static.k == 200
    assert worker._engine("static", None) is static
    assert worker._engine("predictor", 0.5).selector.name == "predictor"
    plain = Worker(Settings(smollm2_dir, Limits(("m",), 2048)))
    plain.loaded = smollm2
    assert plain._engine(None, 0.5) is plain._engine("predictor", 0.5)
    bad = Worker(Settings(smollm2_dir, Limits(("m",), 2048), mask=tmp_path / "missing.safetensors"))
    with pytest.raises(IFPError, match="missing.safetensors"):
        bad.start()
