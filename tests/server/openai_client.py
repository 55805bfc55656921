"""The official openai client against a running `kiln serve`.

Run by tests/test_server_clients.c: openai_client.py BASE_URL MODEL API_KEY.
Plain asserts; prints one line per check and exits non-zero on the first
failure.  Covers completions, chat, streaming with usage, logprobs, echo
(prompt logprobs, what log-likelihood evaluation needs), n=2, stop
strings, seed reproducibility, the model list, and errors raised as the
client's matching exception types.
"""
import json
import sys
import urllib.request

import openai

base, model, key = sys.argv[1], sys.argv[2], sys.argv[3]
client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=120)


def check(name, cond, detail=""):
    if not cond:
        print(f"FAIL {name}: {detail}", flush=True)
        sys.exit(1)
    print(f"ok   {name}", flush=True)


# models
models = client.models.list()
check("models", [m.id for m in models.data] == [model], models)

# a completion
r = client.completions.create(model=model, prompt="The capital of France is", max_tokens=5,
                              temperature=0)
check("completion", r.object == "text_completion" and len(r.choices) == 1
      and r.choices[0].text and r.usage.completion_tokens <= 5
      and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens, r)

# chat
r = client.chat.completions.create(model=model, max_tokens=8, temperature=0,
                                   messages=[{"role": "system", "content": "Be brief."},
                                             {"role": "user", "content": "Say hello."}])
c = r.choices[0]
check("chat", r.object == "chat.completion" and c.message.role == "assistant"
      and c.message.content and c.finish_reason in ("stop", "length"), r)

# streaming chat with usage
chunks = list(client.chat.completions.create(
    model=model, max_tokens=6, temperature=0, stream=True,
    stream_options={"include_usage": True},
    messages=[{"role": "user", "content": "Count to five."}]))
text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
usage = chunks[-1].usage
check("chat stream", text and finish in (["stop"], ["length"]) and usage is not None
      and not chunks[-1].choices and usage.completion_tokens >= 1, chunks[-3:])
check("chat stream = plain", text == client.chat.completions.create(
    model=model, max_tokens=6, temperature=0,
    messages=[{"role": "user", "content": "Count to five."}]).choices[0].message.content, text)

# streaming completion with usage
chunks = list(client.completions.create(model=model, prompt="Once upon a time", max_tokens=5,
                                        temperature=0, stream=True,
                                        stream_options={"include_usage": True}))
check("completion stream", chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
      and "".join(ch.choices[0].text for ch in chunks if ch.choices), chunks[-1])

# logprobs: chat top_logprobs, best first, the sampled token among them
r = client.chat.completions.create(model=model, max_tokens=4, temperature=0, logprobs=True,
                                   top_logprobs=3,
                                   messages=[{"role": "user", "content": "Name a colour."}])
content = r.choices[0].logprobs.content
ok = len(content) == r.usage.completion_tokens
for t in content:
    tops = [x.logprob for x in t.top_logprobs]
    ok = ok and len(tops) == 3 and tops == sorted(tops, reverse=True) and t.logprob <= 0
    ok = ok and abs(t.logprob - tops[0]) < 1e-6  # greedy: the sampled token is the best
    raw = bytes(t.bytes)
    ok = ok and (t.token.encode() == raw or "\ufffd" in t.token)  # a cut character: U+FFFD
check("chat logprobs", ok, content[:2])

# completions logprobs
r = client.completions.create(model=model, prompt="One, two, three,", max_tokens=3,
                              temperature=0, logprobs=2)
lp = r.choices[0].logprobs
check("completion logprobs", len(lp.tokens) == 3 and len(lp.token_logprobs) == 3
      and all(len(t) <= 2 for t in lp.top_logprobs) and "".join(lp.tokens) == r.choices[0].text
      and lp.text_offset[0] == 0, lp)

# echo with logprobs and max_tokens=0: the prompt scored, lm-eval's way
prompt = "The quick brown fox jumps over the lazy dog"
r = client.completions.create(model=model, prompt=prompt, max_tokens=0, echo=True, logprobs=1)
lp = r.choices[0].logprobs
check("echo scoring", r.choices[0].text == prompt and lp.token_logprobs[0] is None
      and len(lp.tokens) == r.usage.prompt_tokens and r.usage.completion_tokens == 0
      and all(x is not None and x <= 0 for x in lp.token_logprobs[1:])
      and lp.top_logprobs[0] is None, lp)

def tokenize(text, special=True):
    req = urllib.request.Request(base + "/tokenize", data=json.dumps(
        {"prompt": text, "add_special_tokens": special}).encode(),
        headers={"Authorization": "Bearer " + key, "Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(req))["tokens"]


# the echoed logprob of a token equals the logprob it had when generated
ids = tokenize(prompt)
g = client.completions.create(model=model, prompt=ids, max_tokens=1, temperature=0, logprobs=0)
gen_lp = g.choices[0].logprobs.token_logprobs[0]
nxt = tokenize(g.choices[0].logprobs.tokens[0], special=False)
e = client.completions.create(model=model, prompt=ids + nxt[:1], max_tokens=0, echo=True,
                              logprobs=0)
echo_lp = e.choices[0].logprobs.token_logprobs[-1]
check("echo = generation logprob", len(nxt) >= 1 and abs(echo_lp - gen_lp) < 1e-2,
      (gen_lp, echo_lp))

# n = 2
r = client.completions.create(model=model, prompt="My favourite fruit is", max_tokens=4,
                              temperature=1.0, n=2, seed=7)
check("n=2", [c.index for c in r.choices] == [0, 1] and r.usage.completion_tokens >= 2, r)

# stop strings: the greedy text cut just before the first match, finish_reason stop
full = client.completions.create(model=model, prompt="1, 2, 3, 4, 5,", max_tokens=12,
                                 temperature=0, extra_body={"ignore_eos": True}).choices[0].text
k = next(i for i in range(len(full) // 2, len(full) - 1) if full.find(full[i:i + 2]) == i)
r = client.completions.create(model=model, prompt="1, 2, 3, 4, 5,", max_tokens=12,
                              temperature=0, extra_body={"ignore_eos": True}, stop=[full[k:k + 2], "\u0001"])
check("stop", r.choices[0].finish_reason == "stop" and r.choices[0].text == full[:k],
      (full, full[k:k + 2], r.choices[0].text))

# seeds: the same seed, the same text
a = [client.completions.create(model=model, prompt="Write a word:", max_tokens=8,
                               temperature=1.0, seed=1234).choices[0].text for _ in range(2)]
b = client.completions.create(model=model, prompt="Write a word:", max_tokens=8,
                              temperature=1.0, seed=99).choices[0].text
check("seed", a[0] == a[1], a)
print(f"     (seed 1234 -> {a[0]!r}, seed 99 -> {b!r})")

# errors as the client's exception types
def raises(name, exc, fn):
    try:
        fn()
    except exc as e:
        check(name, getattr(e, "status_code", None) is not None, e)
        return
    except Exception as e:  # noqa: BLE001 - the wrong type is the failure
        check(name, False, f"raised {type(e).__name__}: {e}")
    check(name, False, "no exception")

raises("unknown model -> NotFoundError", openai.NotFoundError,
       lambda: client.completions.create(model="gpt-4", prompt="x", max_tokens=1))
raises("n=0 -> BadRequestError", openai.BadRequestError,
       lambda: client.completions.create(model=model, prompt="x", max_tokens=1, n=0))
raises("logprobs=21 -> BadRequestError", openai.BadRequestError,
       lambda: client.completions.create(model=model, prompt="x", max_tokens=1, logprobs=21))
raises("context too long -> BadRequestError", openai.BadRequestError,
       lambda: client.completions.create(model=model, prompt="word " * 2000, max_tokens=1))
raises("wrong type -> UnprocessableEntityError", openai.UnprocessableEntityError,
       lambda: client.completions.create(model=model, prompt="x", max_tokens=1,
                                         extra_body={"temperature": "hot"}))
bad = openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0)
raises("wrong key -> AuthenticationError", openai.AuthenticationError,
       lambda: bad.completions.create(model=model, prompt="x", max_tokens=1))
print("openai client: all checks passed")
