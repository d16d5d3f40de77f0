#!/usr/bin/env python3
"""The official `openai` client against `runner serve` (tests/serve.rs starts the server).

  openai_client.py PORT TOKEN MODEL OUT_DIR generate    # n=2 as b64_json, then one as `url`;
                                                         # a wrong key, another model, bad sizes
  openai_client.py PORT TOKEN MODEL OUT_DIR ratelimit   # the queue is full: RateLimitError
Prints one line per check; exits non-zero on the first that fails.
"""
import base64
import sys
import urllib.request

import openai

port, token, model, out, mode = sys.argv[1:6]
base = f"http://127.0.0.1:{port}/v1"
client = openai.OpenAI(base_url=base, api_key=token, max_retries=0, timeout=120)

if mode == "ratelimit":
    try:
        client.images.generate(model=model, prompt="a dog", size="64x64", response_format="b64_json")
    except openai.RateLimitError as e:
        assert e.status_code == 429 and e.body["code"] == "rate_limit_exceeded", e.body
        print("rate limit: RateLimitError")
        sys.exit(0)
    sys.exit("a full queue did not raise RateLimitError")

# The models endpoint lists the served manifest.
ids = [m.id for m in client.models.list().data]
assert ids == [model], ids
print(f"models: {ids}")

# Two images as base64 PNGs, with runner's extensions (seed, steps) in the body.
r = client.images.generate(model=model, prompt="a dog", n=2, size="64x64", response_format="b64_json", extra_body={"seed": 3, "steps": 2, "negative_prompt": "blurry"})
assert len(r.data) == 2, r
for i, d in enumerate(r.data):
    open(f"{out}/b64-{i}.png", "wb").write(base64.b64decode(d.b64_json))
print("generate: 2 images")

# One as a URL of the server (fetched without the key, as OpenAI's URLs are).
r = client.images.generate(prompt="a dog", size="64x64", response_format="url", extra_body={"seed": 3, "steps": 2, "negative_prompt": "blurry"})
url = r.data[0].url
assert url.startswith(f"http://127.0.0.1:{port}/v1/images/files/"), url
open(f"{out}/url.png", "wb").write(urllib.request.urlopen(url).read())
print("url: fetched")

# A wrong key: AuthenticationError.
try:
    openai.OpenAI(base_url=base, api_key="wrong", max_retries=0).images.generate(model=model, prompt="a", size="64x64")
    sys.exit("a wrong key was accepted")
except openai.AuthenticationError as e:
    assert e.body["code"] == "invalid_api_key", e.body
    print("wrong key: AuthenticationError")

# Another model: NotFoundError; bad sizes and n: BadRequestError naming the parameter.
try:
    client.images.generate(model="dall-e-3", prompt="a", size="64x64")
    sys.exit("another model was accepted")
except openai.NotFoundError as e:
    assert e.body["param"] == "model", e.body
    print("other model: NotFoundError")
for kwargs, param in [({"size": "0x0"}, "size"), ({"size": "60x64"}, "size"), ({"size": "64x64x64"}, "size"), ({"n": 0}, "n"), ({"n": 99}, "n"), ({"response_format": "webp"}, "response_format")]:
    try:
        client.images.generate(model=model, prompt="a", **{"size": "64x64", **kwargs})
        sys.exit(f"{kwargs} was accepted")
    except openai.BadRequestError as e:
        assert e.body["param"] == param and e.body["type"] == "invalid_request_error", (kwargs, e.body)
        print(f"{kwargs}: BadRequestError ({e.body['message'][:60]}...)")
