"""The official `openai` and `anthropic` Python SDKs, unchanged, against the
real creditd binary (`creditd serve`, its private PostgreSQL) and a local
stand-in speaking OpenAI's Chat Completions and Anthropic's Messages wire
formats (which also publishes the JWKS the session tokens are signed with).

Run by `.ci/sdks`, which installs the SDKs in a throwaway virtualenv:
    CREDITD_BIN=target/debug/creditd python tests/sdk/test_sdks.py
"""

import json
import math
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import unittest
import urllib.request
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import anthropic
import jwt
import openai
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

ISSUER = "https://clerk.sdks.local"
ADMIN_TOKEN = "sdks-admin-" + os.urandom(8).hex()
PLATFORM_OPENAI_KEY = "sk-platform-sdks-0123456789"
PLATFORM_ANTHROPIC_KEY = "sk-ant-platform-sdks-0123456789"
# What the stand-in reports: OpenAI prompt/completion, Anthropic input/output.
OPENAI_USAGE = (120, 15)
ANTHROPIC_USAGE = (200, 12)
IMAGE = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8/5+hHgAHggJ/PchI7wAAAABJRU5ErkJggg=="


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class StandIn(BaseHTTPRequestHandler):
    """OpenAI and Anthropic as they answer, and the JWKS; every provider
    request is recorded as (path, headers, body)."""

    jwks = {}
    received = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path == "/.well-known/jwks.json":
            return self.json(200, StandIn.jwks)
        self.json(404, {"error": {"message": "no such path"}})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)))
        StandIn.received.append((self.path, dict(self.headers), body))
        if self.path == "/v1/chat/completions":
            return self.openai(body)
        if self.path == "/v1/messages":
            return self.anthropic(body)
        self.json(404, {"error": {"message": "no such path"}})

    def json(self, status, value):
        data = json.dumps(value).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def events(self, frames):
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("connection", "close")
        self.end_headers()
        for event, data in frames:
            head = f"event: {event}\n" if event else ""
            text = data if isinstance(data, str) else json.dumps(data)
            self.wfile.write(f"{head}data: {text}\n\n".encode())
            self.wfile.flush()
        self.close_connection = True

    def openai(self, body):
        if self.headers.get("authorization") != f"Bearer {PLATFORM_OPENAI_KEY}":
            return self.json(401, {"error": {"message": "bad key", "type": "invalid_request_error"}})
        prompt, completion = OPENAI_USAGE
        usage = {"prompt_tokens": prompt, "completion_tokens": completion,
                 "total_tokens": prompt + completion,
                 "prompt_tokens_details": {"cached_tokens": 0}}
        base = {"id": "chatcmpl-sdk", "created": 1_741_570_283, "model": body["model"]}
        wants_tool = body.get("tools") and body["messages"][-1]["role"] != "tool"
        if wants_tool:
            message = {"role": "assistant", "content": None, "tool_calls": [{
                "id": "call_1", "type": "function",
                "function": {"name": "add_todo", "arguments": "{\"title\": \"milk\"}"}}]}
            finish = "tool_calls"
        else:
            message = {"role": "assistant", "content": "Hello from the stand-in"}
            finish = "stop"
        if not body.get("stream"):
            return self.json(200, {**base, "object": "chat.completion", "choices": [
                {"index": 0, "message": message, "finish_reason": finish}], "usage": usage})
        chunk = {**base, "object": "chat.completion.chunk", "usage": None}
        frames = [(None, {**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})]
        for piece in ["Hello", " from", " the", " stand-in"]:
            frames.append((None, {**chunk, "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}))
        frames.append((None, {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
        if (body.get("stream_options") or {}).get("include_usage"):
            frames.append((None, {**chunk, "choices": [], "usage": usage}))
        frames.append((None, "[DONE]"))
        self.events(frames)

    def anthropic(self, body):
        if self.headers.get("x-api-key") != PLATFORM_ANTHROPIC_KEY:
            return self.json(401, {"type": "error", "error": {"type": "authentication_error", "message": "bad key"}})
        input_tokens, output_tokens = ANTHROPIC_USAGE
        usage = {"input_tokens": input_tokens, "output_tokens": output_tokens,
                 "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
        message = {"id": "msg_sdk", "type": "message", "role": "assistant", "model": body["model"],
                   "stop_sequence": None}
        if not body.get("stream"):
            return self.json(200, {**message, "content": [{"type": "text", "text": "A red pixel."}],
                                   "stop_reason": "end_turn", "usage": usage})
        self.events([
            ("message_start", {"type": "message_start", "message": {
                **message, "content": [], "stop_reason": None,
                "usage": {**usage, "output_tokens": 1}}}),
            ("content_block_start", {"type": "content_block_start", "index": 0,
                                     "content_block": {"type": "text", "text": ""}}),
            ("ping", {"type": "ping"}),
            ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                     "delta": {"type": "text_delta", "text": "A red"}}),
            ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                     "delta": {"type": "text_delta", "text": " pixel."}}),
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            ("message_delta", {"type": "message_delta",
                               "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                               "usage": {"output_tokens": output_tokens}}),
            ("message_stop", {"type": "message_stop"}),
        ])


class Creditd:
    """The real binary on a free port, with its private PostgreSQL."""

    def __init__(self, stand_in_url):
        self.work = tempfile.mkdtemp(prefix="creditd-sdks.")
        os.chmod(self.work, 0o755)
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = json.loads(RSAAlgorithm.to_jwk(self.key.public_key()))
        jwk.update({"kid": "sdks", "alg": "RS256", "use": "sig"})
        StandIn.jwks = {"keys": [jwk]}
        self.base = f"http://127.0.0.1:{free_port()}"
        env = dict(os.environ,
                   CREDITD__SERVER__BIND=self.base.removeprefix("http://"),
                   CREDITD__DATABASE__DATA_DIR=os.path.join(self.work, "postgres"),
                   CREDITD__CLERK__JWKS_URL=f"{stand_in_url}/.well-known/jwks.json",
                   CREDITD__CLERK__ISSUER=ISSUER,
                   CREDITD__ADMIN__TOKEN=ADMIN_TOKEN,
                   CREDITD__PROVIDERS__OPENAI_BASE_URL=stand_in_url,
                   CREDITD__PROVIDERS__ANTHROPIC_BASE_URL=stand_in_url,
                   CREDITD__PROVIDERS__OPENAI_API_KEY=PLATFORM_OPENAI_KEY,
                   CREDITD__PROVIDERS__ANTHROPIC_API_KEY=PLATFORM_ANTHROPIC_KEY,
                   CREDITD__LOG__LEVEL="warn")
        binary = os.environ.get("CREDITD_BIN", "target/debug/creditd")
        self.log = open(os.path.join(self.work, "creditd.log"), "w")
        self.process = subprocess.Popen([binary, "serve"], env=env, stdout=self.log,
                                        stderr=subprocess.STDOUT)
        for _ in range(600):
            try:
                if self.request("GET", "/readyz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("creditd did not become ready")

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()
        shutil.rmtree(self.work, ignore_errors=True)

    def session(self, user):
        now = int(time.time())
        claims = {"sub": user, "iss": ISSUER, "iat": now, "nbf": now - 10, "exp": now + 3600}
        return jwt.encode(claims, self.key, algorithm="RS256", headers={"kid": "sdks"})

    def request(self, method, path, token=None, body=None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method)
        request.add_header("content-type", "application/json")
        if token:
            request.add_header("authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                text = response.read().decode()
                return response.status, (json.loads(text) if text.strip().startswith(("{", "[")) else text)
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"null")

    def fund(self, user, micros):
        status, body = self.request("POST", f"/admin/accounts/{user}/credits", ADMIN_TOKEN,
                                    {"amountMicros": micros, "key": f"sdks-{user}", "reason": "SDK tests"})
        assert status in (200, 201), body

    def new_key(self, user):
        status, body = self.request("POST", "/api/credits/api-keys", self.session(user), {"name": "SDK tests"})
        assert status == 201, body
        return body["key"], body["apiKey"]["id"]

    def balance_micros(self, user):
        return self.request("GET", "/api/credits", self.session(user))[1]["balanceMicros"]

    def metric(self, name, *labels):
        """The sum of a family's series that carry every label given."""
        text = self.request("GET", "/metrics")[1]
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name + "{") and all(label in line for label in labels))


class TheOfficialSdks(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.stand_in = ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
        threading.Thread(target=cls.stand_in.serve_forever, daemon=True).start()
        cls.creditd = Creditd(f"http://127.0.0.1:{cls.stand_in.server_address[1]}")
        cls.creditd.fund("user_sdk", 10_000_000)
        cls.key, cls.key_id = cls.creditd.new_key("user_sdk")
        cls.openai = openai.OpenAI(base_url=cls.creditd.base + "/v1", api_key=cls.key)
        cls.anthropic = anthropic.Anthropic(base_url=cls.creditd.base, api_key=cls.key)
        models = cls.openai.models.list()
        cls.prices = {model.id: model.model_extra["pricing"] for model in models.data}

    @classmethod
    def tearDownClass(cls):
        cls.creditd.stop()
        cls.stand_in.shutdown()

    def cost(self, model, input_tokens, output_tokens):
        """The price table's cost of a usage, in micros, rounded up once."""
        per_million = lambda price: Decimal(price) * 10**12
        pricing = self.prices[model]
        total = input_tokens * per_million(pricing["prompt"]) + output_tokens * per_million(pricing["completion"])
        return math.ceil(total / 1_000_000)

    def charged(self, call):
        before = self.creditd.balance_micros("user_sdk")
        result = call()
        return result, before - self.creditd.balance_micros("user_sdk")

    def test_models_lists_the_price_table_with_prices_per_token(self):
        self.assertIn("gpt-4o", self.prices)
        self.assertIn("claude-sonnet-4-5", self.prices)
        self.assertEqual(Decimal(self.prices["gpt-4o"]["prompt"]) * 10**12, 2_430_556)

    def test_an_openai_completion_is_charged_the_reported_usage_at_the_tables_price(self):
        answer, charged = self.charged(lambda: self.openai.chat.completions.create(
            model="gpt-4o", max_tokens=100, temperature=0.2,
            messages=[{"role": "user", "content": "Say hello"}]))
        self.assertEqual(answer.choices[0].message.content, "Hello from the stand-in")
        expected = self.cost("gpt-4o", *OPENAI_USAGE)
        self.assertEqual(charged, expected)
        self.assertEqual(answer.usage.model_extra["cost"]["amount_micros"], expected)

    def test_an_openai_stream_is_charged_the_reported_usage_and_ends_with_its_cost(self):
        def stream():
            chunks = list(self.openai.chat.completions.create(
                model="gpt-4o", max_tokens=100, stream=True,
                stream_options={"include_usage": True},
                messages=[{"role": "user", "content": "Say hello"}]))
            return chunks
        chunks, charged = self.charged(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        self.assertEqual(text, "Hello from the stand-in")
        expected = self.cost("gpt-4o", *OPENAI_USAGE)
        self.assertEqual(charged, expected)
        self.assertEqual(chunks[-1].usage.model_extra["cost"]["amount_micros"], expected)

    def test_a_tool_call_and_its_result_pass_through(self):
        tools = [{"type": "function", "function": {"name": "add_todo", "parameters": {
            "type": "object", "properties": {"title": {"type": "string"}}}}}]
        messages = [{"role": "user", "content": "Add milk"}]
        first = self.openai.chat.completions.create(model="gpt-4o", max_tokens=50, tools=tools, messages=messages)
        call = first.choices[0].message.tool_calls[0]
        self.assertEqual(call.function.name, "add_todo")
        messages += [first.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": "added"}]
        second = self.openai.chat.completions.create(model="gpt-4o", max_tokens=50, tools=tools, messages=messages)
        self.assertEqual(second.choices[0].message.content, "Hello from the stand-in")
        _, _, sent = StandIn.received[-1]
        self.assertEqual(sent["messages"][-1], {"role": "tool", "tool_call_id": "call_1", "content": "added"})
        self.assertEqual(sent["tools"], tools)

    def test_an_anthropic_image_block_passes_through_and_is_charged_the_reported_usage(self):
        content = [{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": IMAGE}},
                   {"type": "text", "text": "What is this?"}]
        message, charged = self.charged(lambda: self.anthropic.messages.create(
            model="claude-sonnet-4-5", max_tokens=100, system="Be brief.",
            messages=[{"role": "user", "content": content}]))
        self.assertEqual(message.content[0].text, "A red pixel.")
        self.assertEqual(charged, self.cost("claude-sonnet-4-5", *ANTHROPIC_USAGE))
        _, headers, sent = StandIn.received[-1]
        self.assertEqual(sent["messages"][0]["content"], content)
        self.assertEqual(headers.get("x-api-key"), PLATFORM_ANTHROPIC_KEY)

    def test_an_anthropic_stream_is_charged_the_reported_usage(self):
        def stream():
            with self.anthropic.messages.stream(model="claude-sonnet-4-5", max_tokens=100,
                                                messages=[{"role": "user", "content": "Hi"}]) as events:
                text = "".join(events.text_stream)
                return text, events.get_final_message()
        (text, final), charged = self.charged(stream)
        self.assertEqual(text, "A red pixel.")
        self.assertEqual(final.usage.output_tokens, ANTHROPIC_USAGE[1])
        self.assertEqual(charged, self.cost("claude-sonnet-4-5", *ANTHROPIC_USAGE))

    def test_out_of_credits_raises_the_sdks_402_error_and_is_not_retried(self):
        key, _ = self.creditd.new_key("user_sdk_broke")
        client = openai.OpenAI(base_url=self.creditd.base + "/v1", api_key=key)
        series = ("creditd_http_requests_total", 'route="/v1/chat/completions"', 'status="402"')
        before, calls = self.creditd.metric(*series), len(StandIn.received)
        with self.assertRaises(openai.APIStatusError) as raised:
            client.chat.completions.create(model="gpt-4o", max_tokens=100,
                                           messages=[{"role": "user", "content": "Hi"}])
        self.assertEqual(raised.exception.status_code, 402)
        self.assertEqual(raised.exception.body["code"], "insufficient_credits")
        self.assertEqual(self.creditd.metric(*series) - before, 1)
        self.assertEqual(len(StandIn.received), calls)
        claude = anthropic.Anthropic(base_url=self.creditd.base, api_key=key)
        with self.assertRaises(anthropic.APIStatusError) as raised:
            claude.messages.create(model="claude-sonnet-4-5", max_tokens=100,
                                   messages=[{"role": "user", "content": "Hi"}])
        self.assertEqual(raised.exception.status_code, 402)

    def test_a_revoked_key_raises_authentication_error(self):
        key, key_id = self.creditd.new_key("user_sdk_revoked")
        status, _ = self.creditd.request("DELETE", f"/api/credits/api-keys/{key_id}",
                                         self.creditd.session("user_sdk_revoked"))
        self.assertEqual(status, 204)
        with self.assertRaises(openai.AuthenticationError):
            openai.OpenAI(base_url=self.creditd.base + "/v1", api_key=key).models.list()
        with self.assertRaises(anthropic.AuthenticationError):
            anthropic.Anthropic(base_url=self.creditd.base, api_key=key).messages.create(
                model="claude-sonnet-4-5", max_tokens=10, messages=[{"role": "user", "content": "Hi"}])


if __name__ == "__main__":
    unittest.main(verbosity=2)
