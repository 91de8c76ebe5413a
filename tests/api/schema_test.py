"""The server API against its own OpenAPI description, with Schemathesis, and the README's
Python backend lines run as written. Usage: schema_test.py FANOUT_BIN SCHEMATHESIS_BIN.

Every process it starts (fanout nodes, redis-server, schemathesis) is stopped by its PID.
"""

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.parse

API_KEY = "fanout-schemathesis-api-key-0123456789"
SECRET = "fanout-schemathesis-secret-0123456789"
PATIENCE = 20.0  # how long to wait for what normally takes milliseconds
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORK = os.path.join(ROOT, "target", "api-schema")
# A fixed seed makes the run a regression test (the same requests every time; the seed is
# printed either way); SCHEMATHESIS_SEED=random explores new ones.
SEED = os.environ.get("SCHEMATHESIS_SEED", "20261202")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=PATIENCE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=PATIENCE)


class Redis:
    def __init__(self):
        self.port = free_port()
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + PATIENCE
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                stop(self.proc)
                raise RuntimeError("redis-server did not come up")
            time.sleep(0.05)

    def url(self):
        return f"redis://127.0.0.1:{self.port}"


class Node:
    """A fanout node with the server API, on free loopback ports; stopped by PID."""

    def __init__(self, binary, *extra):
        args = [binary, "--listen", "127.0.0.1:0", "--threads", "2",
                "--api-listen", "127.0.0.1:0", "--api-key", API_KEY,
                "--token-hmac-secret", SECRET, "--drain-delay", "0", "--drain-time", "0", *extra]
        self.log = open(os.path.join(WORK, f"node-{free_port()}.log"), "w+")
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self.log,
                                     env={**os.environ, "RUST_LOG": "warn"})
        first = self.proc.stdout.readline().decode().strip()
        second = self.proc.stdout.readline().decode().strip()
        if not (first.startswith("listening on ") and second.startswith("api listening on ")):
            self.stop()
            raise RuntimeError(f"fanout did not start: {first!r} {second!r}")
        self.addr = first.removeprefix("listening on ")
        self.api = "http://" + second.removeprefix("api listening on ")
        self.wait_ready()

    def wait_ready(self):
        import requests
        deadline = time.monotonic() + PATIENCE
        while requests.get(f"http://{self.addr}/readyz", timeout=PATIENCE).status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError("node not ready")
            time.sleep(0.05)

    def stop(self):
        stop(self.proc)
        self.log.seek(0)
        text = self.log.read()
        self.log.close()
        return text


def schemathesis(st_bin, node, what):
    """Runs every check of Schemathesis against the node's API; True when it finds nothing."""
    cmd = [st_bin, "run", f"{node.api}/api/openapi.json",
           "--header", f"Authorization: apikey {API_KEY}",
           "--checks", "all", "--seed", SEED, "--generation-database", "none",
           "--request-timeout", str(PATIENCE), "--no-color"]
    proc = subprocess.Popen(cmd, cwd=WORK, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = proc.communicate(timeout=900)
    finally:
        stop(proc)
    out = out.decode(errors="replace")
    ok = proc.returncode == 0 and "No issues found" in out
    if not ok:
        print(f"--- schemathesis against {what} (exit {proc.returncode}):\n{out}")
    else:
        summary = [l.strip() for l in out.splitlines() if "generated" in l]
        print(f"    {what}: {' '.join(summary)}")
    return ok


def readme_backend_lines():
    """The Python block of the README's Authentication section."""
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    section = readme.split("### Authentication", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "no Python block in the README's Authentication section"
    return match.group(1)


def readme_backend_snippet_works(node):
    """The README's lines, as written (only the API's address is this node's): the user's
    client gets the publish on its own channel, then is closed 4002."""
    from websockets.sync.client import connect
    from websockets.exceptions import ConnectionClosed
    import jwt
    code = readme_backend_lines()
    assert '"http://fanout-api.internal:8081"' in code, code
    code = code.replace('"http://fanout-api.internal:8081"', repr(node.api))
    user_token = jwt.encode({"sub": "42", "exp": int(time.time()) + 600}, SECRET,
                            algorithm="HS256")
    channel = urllib.parse.quote("user:#42")
    with connect(f"ws://{node.addr}/ws?channel={channel}&token={user_token}",
                 open_timeout=PATIENCE, close_timeout=PATIENCE) as ws:
        exec(compile(code, "README.md", "exec"), {"SECRET": SECRET, "API_KEY": API_KEY})
        got = json.loads(ws.recv(timeout=PATIENCE))
        assert got == {"text": "your order shipped"}, got
        try:
            ws.recv(timeout=PATIENCE)
            raise AssertionError("still open after the disconnect")
        except ConnectionClosed as e:
            assert e.rcvd is not None and (e.rcvd.code, e.rcvd.reason) == (
                4002, "disconnected by the server"), e
    return True


def main(binary, st_bin):
    os.makedirs(WORK, exist_ok=True)
    passed = failed = 0
    redis = Redis()
    nodes = []
    try:
        # Every channel keeps history, so /api/history answers for any valid name and publishes
        # take the history path.
        config = os.path.join(WORK, "fanout.toml")
        with open(config, "w") as f:
            f.write('[[namespace]]\nname = "*"\nhistory_size = 20\nhistory_ttl = 60\n')
        standalone = Node(binary, "--config", config)
        nodes.append(standalone)
        with_redis = Node(binary, "--config", config, "--redis", redis.url())
        nodes.append(with_redis)
        checks = [
            ("schemathesis, standalone node", lambda: schemathesis(st_bin, standalone, "standalone")),
            ("schemathesis, node on Redis", lambda: schemathesis(st_bin, with_redis, "with Redis")),
            ("README backend lines, standalone", lambda: readme_backend_snippet_works(standalone)),
            ("README backend lines, on Redis", lambda: readme_backend_snippet_works(with_redis)),
        ]
        for name, check in checks:
            try:
                ok = check()
            except Exception as e:  # a failed check, reported with the others
                print(f"    {name}: {type(e).__name__}: {e}")
                ok = False
            print(f"{'ok  ' if ok else 'FAIL'} {name}")
            passed += ok
            failed += not ok
    finally:
        for node in nodes:
            log = node.stop()
            if "panicked" in log:
                print(f"FAIL a node panicked:\n{log}")
                failed += 1
        stop(redis.proc)
    print(f"{passed} passed, {failed} failed")
    return failed == 0


if __name__ == "__main__":
    sys.exit(0 if main(sys.argv[1], sys.argv[2]) else 1)
