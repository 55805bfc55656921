"""The chat page of `kiln serve` in headless Chromium.

Run by tests/test_server_clients.c: chat_page.py BASE_URL SCREENSHOT.
Drives Chromium over the DevTools protocol on a pipe (--remote-debugging-pipe:
JSON messages ending in NUL on fds 3 and 4, no WebSocket library needed):
loads the page, waits for it to find the model, sends a message through the
page's own form, waits for the streamed answer, checks that it came in
several chunks and finished, and saves a screenshot.  Exits non-zero on
failure.
"""
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

base, shot = sys.argv[1], sys.argv[2]
TIMEOUT = 180.0

# Debian's /usr/bin/chromium is a shell wrapper that does not pass fds 3
# and 4 on; the binary behind it is used when present
browser = next((b for b in ("/usr/lib/chromium/chromium",) if os.access(b, os.X_OK)), None) \
    or shutil.which("chromium") or shutil.which("chromium-browser")
if not browser:
    print("FAIL chromium is not installed (scripts/setup.sh installs it)")
    sys.exit(1)

to_r, to_w = os.pipe()      # our commands -> chromium's fd 3
from_r, from_w = os.pipe()  # chromium's fd 4 -> our replies
profile = tempfile.mkdtemp(prefix="kiln-chrome-")


def child_fds():
    # fds 3 and 4 are what --remote-debugging-pipe reads and writes; Popen's
    # own fd closing runs after this, hence close_fds=False below
    # (through fresh copies: dup2 onto the same number would keep the pipe's
    # close-on-exec flag)
    r, w = os.dup(to_r), os.dup(from_w)
    os.dup2(r, 3)
    os.dup2(w, 4)
    for fd in (r, w, to_r, from_w, to_w, from_r):
        if fd > 4:
            os.close(fd)


proc = subprocess.Popen(
    [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
     "--no-first-run", "--no-default-browser-check", "--remote-debugging-pipe",
     "--window-size=1000,700", "--user-data-dir=" + profile, "about:blank"],
    close_fds=False, preexec_fn=child_fds,
    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
os.close(to_r)
os.close(from_w)
inbox = b""
next_id = 0


def send(method, params=None, session=None):
    """One command; returns its result (events before it are dropped)."""
    global next_id, inbox
    next_id += 1
    msg = {"id": next_id, "method": method, "params": params or {}}
    if session:
        msg["sessionId"] = session
    os.write(to_w, json.dumps(msg).encode() + b"\0")
    deadline = time.time() + TIMEOUT
    while time.time() < deadline:
        while b"\0" in inbox:
            raw, inbox = inbox.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
        chunk = os.read(from_r, 1 << 16)
        if not chunk:
            raise RuntimeError("chromium closed the pipe")
        inbox += chunk
    raise RuntimeError(f"{method}: no reply")


def evaluate(session, expr):
    r = send("Runtime.evaluate", {"expression": expr, "returnByValue": True}, session)
    return r.get("result", {}).get("value")


def wait_for(session, expr, what):
    deadline = time.time() + TIMEOUT
    while time.time() < deadline:
        v = evaluate(session, expr)
        if v:
            return v
        time.sleep(0.1)
    raise RuntimeError("timed out waiting for " + what)


try:
    target = send("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    send("Page.enable", session=session)
    send("Page.navigate", {"url": base + "/"}, session)
    wait_for(session, "document.readyState === 'complete' && document.getElementById('model') "
             "&& document.getElementById('model').textContent.includes('context')",
             "the page to find the model")
    evaluate(session, "document.getElementById('input').value = 'Write one sentence about the sea.';"
                      "document.getElementById('max_tokens').value = '24';"
                      # greedy: the page's default temperature (0.7) let the
                      # sanitized build's tiny model end after one token now and then
                      "document.getElementById('temperature').value = '0';"
                      "document.getElementById('form').requestSubmit(); true")
    state = json.loads(wait_for(session, """(() => {
        const m = document.querySelectorAll('.msg.assistant');
        const last = m[m.length - 1];
        if (!last || last.dataset.done !== '1') return null;
        return JSON.stringify({text: last.firstChild ? last.firstChild.textContent : '',
                               chunks: parseInt(last.dataset.chunks, 10),
                               finish: last.dataset.finish,
                               errors: document.querySelectorAll('.msg.error').length});
    })()""", "the streamed answer"))
    png = send("Page.captureScreenshot", {"format": "png"}, session)["data"]
    with open(shot, "wb") as f:
        f.write(base64.b64decode(png))
    print(f"chat page: answer {state['text']!r} in {state['chunks']} chunks, "
          f"finish {state['finish']}, screenshot {shot}")
    ok = (state["errors"] == 0 and state["text"].strip() and state["chunks"] >= 2
          and state["finish"] in ("stop", "length"))
    if not ok:
        print("FAIL chat page:", state)
        sys.exit(1)
finally:
    try:
        send("Browser.close")
    except Exception:  # noqa: BLE001 - closing a browser that is gone
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
    shutil.rmtree(profile, ignore_errors=True)
