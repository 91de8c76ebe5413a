"""Integration test of deploy/local/cluster: three fanout nodes + Redis behind nginx.

Proves, with real processes and sockets: clients connecting through the one load-balancer URL
land on different nodes (each node's own /metrics gauge fanout_connections_open); every client
receives every other client's message exactly once across nodes (Redis Pub/Sub); SIGTERM on one
node closes exactly its clients (known per client from the gauges) with 1001, they reconnect
through the load balancer onto the surviving nodes, and the clients on the other nodes keep
chatting through the whole failover without losing, duplicating or reordering a message. Ctrl-C
(SIGINT) to the cluster script stops every process it started. Bounded (scenario < 120 s, about
10 s normally); any process still alive at the end is killed by PID.
"""

import asyncio
import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import websockets

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLIENTS = 9
DEADLINE = 120.0  # seconds for the scenario, cluster start included (typically ~10 s)
CHANNEL = f"deploytest{os.getpid()}"
failures = []
passed = []


def log(msg):
    print(f"[cluster_test {time.monotonic() - T0:5.1f}s] {msg}", flush=True)


def check(cond, what):
    log(("ok   " if cond else "FAIL ") + what)
    (passed if cond else failures).append(what)
    return cond


def gauge(addr):
    """fanout_connections_open of one node, read from the node itself (not through nginx)."""
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=2) as r:
        text = r.read().decode()
    m = re.search(r"^fanout_connections_open (\d+)$", text, re.M)
    if not m:
        raise AssertionError(f"no fanout_connections_open in /metrics of {addr}")
    return int(m.group(1))


class Client:
    def __init__(self, idx, url):
        self.idx, self.url = idx, url
        self.ws = None
        self.got = []
        self.close_codes = []
        self.closed = asyncio.Event()
        self.task = None

    async def connect(self, attempts=20):
        last = None
        for _ in range(attempts):
            try:
                self.ws = await websockets.connect(self.url, open_timeout=3, max_size=None)
                self.closed = asyncio.Event()
                self.task = asyncio.create_task(self._reader())
                return
            except (OSError, websockets.InvalidStatus, websockets.InvalidHandshake) as e:
                last = e  # e.g. 503 from a draining node that nginx could not skip
                await asyncio.sleep(0.2)
        raise AssertionError(f"client {self.idx} could not connect: {last!r}")

    async def _reader(self):
        try:
            async for msg in self.ws:
                self.got.append(msg)
        except websockets.ConnectionClosed:
            pass
        self.close_codes.append(self.ws.close_code)
        self.closed.set()

    async def send(self, text):
        await self.ws.send(text)


async def sync(clients, tag):
    """Until every client has seen a probe from every client. A node subscribes to Redis when its
    first local client joins a channel; a message published before that SUBSCRIBE lands would
    be missed by design, so the exact-once round waits until every path is known to be live."""
    for rnd in range(10):
        want = {f"sync-{tag}-{rnd}-{c.idx}" for c in clients}
        for c in clients:
            await c.send(f"sync-{tag}-{rnd}-{c.idx}")
        end = time.monotonic() + 2.0
        while time.monotonic() < end:
            if all(want <= set(c.got) for c in clients):
                return True
            await asyncio.sleep(0.05)
    return False


async def exact_once_round(clients, tag, per_client=3):
    for c in clients:
        c.got.clear()
    sent = [f"{tag}-c{c.idx}-m{k}" for c in clients for k in range(per_client)]
    for k in range(per_client):
        for c in clients:
            await c.send(f"{tag}-c{c.idx}-m{k}")
    want = collections.Counter(sent)
    end = time.monotonic() + 10.0
    def got(c):
        return collections.Counter(m for m in c.got if isinstance(m, str) and m.startswith(tag + "-"))
    while time.monotonic() < end and not all(got(c) == want for c in clients):
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)  # a duplicate would arrive right behind the original
    bad = [(c.idx, sum((got(c) - want).values()), sum((want - got(c)).values())) for c in clients
           if got(c) != want]
    check(not bad, f"{tag}: each of {len(clients)} clients received all {len(sent)} messages "
          f"exactly once" + (f" (client, extra, missing): {bad}" if bad else ""))


async def node_of_each_client(clients, nodes):
    """Connects the clients one by one and attributes each to the node whose own /metrics gauge
    went up by one: where each client landed is measured, not assumed."""
    where = {}
    before = {i: gauge(a) for i, (_, a) in nodes.items()}
    for c in clients:
        await c.connect()
        end = time.monotonic() + 10.0
        while True:
            now = {i: gauge(a) for i, (_, a) in nodes.items()}
            grown = [i for i in now if now[i] == before[i] + 1]
            if sum(now.values()) == sum(before.values()) + 1 and len(grown) == 1:
                where[c.idx] = grown[0]
                break
            if time.monotonic() > end:
                raise AssertionError(f"client {c.idx}: no node's gauge grew by one ({before} -> {now})")
            await asyncio.sleep(0.05)
        before = now
    return where


async def chatter(senders, tag, stop, max_rounds=400):
    """Each sender publishes one numbered message every 50 ms until `stop` is set."""
    k = 0
    while not stop.is_set() and k < max_rounds:
        for c in senders:
            await c.send(f"{tag}-c{c.idx}-m{k}")
        k += 1
        await asyncio.sleep(0.05)
    return k


async def scenario(lb, nodes, procs_alive):
    url = f"ws://{lb}/ws?channel={CHANNEL}"
    clients = [Client(i, url) for i in range(CLIENTS)]
    where = await node_of_each_client(clients, nodes)
    counts = {i: gauge(a) for i, (_, a) in nodes.items()}
    log(f"node of each client (from the nodes' own /metrics): {where}; per node {counts}")
    check(sum(counts.values()) == CLIENTS, f"the nodes hold {CLIENTS} connections in total")
    check(all(n > 0 for n in counts.values()), "every node got clients through the load balancer")

    check(await sync(clients, "a"), "all clients see each other (sync before round 1)")
    await exact_once_round(clients, "r1")

    # Stop the busiest node the way Kubernetes does: SIGTERM, then it drains.
    victim = max(counts, key=counts.get)
    vpid, vaddr = nodes[victim]
    on_victim = [c for c in clients if where[c.idx] == victim]
    survivors = [c for c in clients if where[c.idx] != victim]
    for c in clients:
        c.got.clear()
    log(f"SIGTERM node {victim} (pid {vpid}, clients {[c.idx for c in on_victim]})")
    os.kill(vpid, signal.SIGTERM)
    t_kill = time.monotonic()
    # The clients on the other nodes keep chatting through the whole failover: the drain, the
    # closes, the reconnects through the load balancer.
    stop = asyncio.Event()
    talk = asyncio.create_task(chatter(survivors, "r2", stop))

    # cluster defaults: drain delay 1 s + drain time 2 s; generous margin for a loaded machine
    end = time.monotonic() + 20.0
    while time.monotonic() < end and not all(c.closed.is_set() for c in on_victim):
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)
    dropped = [c for c in clients if c.closed.is_set()]
    log(f"clients {[c.idx for c in dropped]} closed {time.monotonic() - t_kill:.1f}s after SIGTERM, "
        f"codes {[c.close_codes[-1] for c in dropped]}")
    check(set(dropped) == set(on_victim),
          f"exactly the stopped node's {len(on_victim)} clients were closed")
    check(bool(dropped) and all(c.close_codes[-1] == 1001 for c in dropped),
          "they were closed with 1001 (going away)")

    # Reconnect at once, as a browser would, while the stopped node may still be draining (its
    # upgrades then get 503, which nginx retries on another node).
    for c in dropped:
        await c.connect()
    end = time.monotonic() + 15.0
    while time.monotonic() < end and procs_alive(vpid):
        await asyncio.sleep(0.1)
    check(not procs_alive(vpid), f"node {victim} exited after its drain")
    await asyncio.sleep(0.5)  # a little more chatter with everyone back
    stop.set()
    rounds = await talk
    # Every survivor got every survivor's message exactly once and in order, failover or not.
    want = [f"r2-c{c.idx}-m{k}" for c in survivors for k in range(rounds)]
    end = time.monotonic() + 10.0

    def r2(c):
        return [m for m in c.got if isinstance(m, str) and m.startswith("r2-")]
    while time.monotonic() < end and not all(sorted(r2(c)) == sorted(want) for c in survivors):
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)  # a duplicate would arrive right behind the original
    bad = [c.idx for c in survivors if sorted(r2(c)) != sorted(want)]
    check(not bad, f"r2: {len(survivors)} clients on the other nodes kept chatting through the failover: "
          f"each got all {len(want)} messages exactly once" + (f" (not: clients {bad})" if bad else ""))
    disorder = [c.idx for c in survivors for s in survivors
                if [m for m in r2(c) if m.startswith(f"r2-c{s.idx}-")] !=
                [f"r2-c{s.idx}-m{k}" for k in range(rounds)]]
    check(not disorder, "and in each sender's order" + (f" (not: {disorder})" if disorder else ""))

    check(not any(c.closed.is_set() for c in clients),
          "no reconnected client was closed again (none landed on the stopped node)")
    rest = {i: gauge(a) for i, (_, a) in nodes.items() if i != victim}
    log(f"connections per surviving node after reconnects: {rest}")
    check(sum(rest.values()) == CLIENTS, f"all {CLIENTS} clients are back, on the surviving nodes")
    check(await sync(clients, "b"), "all clients see each other again (sync after failover)")
    await exact_once_round(clients, "r3")

    for c in clients:
        await c.ws.close()
        if c.task:
            await c.task


def main():
    state = tempfile.mkdtemp(prefix="fanout-cluster-test.")
    env = dict(os.environ, CLUSTER_DIR=state)
    cluster = subprocess.Popen([os.path.join(ROOT, "deploy/local/cluster"), "--port", "0"],
                               stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    nodes, lb = {}, None
    node_pids = []
    other_pids = []

    def alive(pid):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        # A zombie awaiting the cluster script's wait counts as gone.
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().split(") ", 1)[1][0] != "Z"
        except OSError:
            return False

    try:
        # Bound the start-up even if the script hangs silently (e.g. a long cargo build).
        watchdog = threading.Timer(60, cluster.send_signal, (signal.SIGTERM,))
        watchdog.start()
        for line in cluster.stdout:
            line = line.strip()
            log(f"cluster: {line}")
            m = re.match(r"node (\d+) pid (\d+) addr (\S+)", line)
            if m:
                nodes[int(m.group(1))] = (int(m.group(2)), m.group(3))
                node_pids.append(int(m.group(2)))
            m = re.match(r"(redis|nginx) pid (\d+) ", line)
            if m:
                other_pids.append(int(m.group(2)))
            m = re.match(r"cluster ready: ws://(\S+)/ws", line)
            if m:
                lb = m.group(1)
                break
        watchdog.cancel()
        if not check(lb is not None and len(nodes) == 3, "cluster started: 3 nodes + nginx"):
            return 1
        # The page is reachable through the load balancer too.
        try:
            with urllib.request.urlopen(f"http://{lb}/", timeout=10) as r:
                check(r.status == 200 and b"<html" in r.read().lower(), "chat page served via nginx")
        except OSError as e:
            check(False, f"chat page served via nginx ({e!r})")

        remaining = DEADLINE - (time.monotonic() - T0)
        try:
            asyncio.run(asyncio.wait_for(scenario(lb, nodes, alive), remaining))
        except (asyncio.TimeoutError, TimeoutError):
            check(False, f"scenario finished within the {DEADLINE:.0f} s budget")
        except AssertionError as e:
            check(False, str(e))
        except Exception as e:  # a real error (e.g. a connection closed mid-round) fails the test
            check(False, f"scenario raised {e!r}")
    finally:
        # Stop the cluster as a user does: Ctrl-C, i.e. SIGINT to the script only (its children
        # run in their own sessions). It must stop everything it started, by itself.
        if cluster.poll() is None:
            cluster.send_signal(signal.SIGINT)
            try:
                code = cluster.wait(timeout=45)
                check(code == 130, f"the cluster script exits 130 after Ctrl-C (got {code})")
            except subprocess.TimeoutExpired:
                check(False, "the cluster script stops within 45 s of Ctrl-C")
                cluster.kill()
                cluster.wait()
        left = [p for p in node_pids + other_pids if alive(p)]
        check(not left and len(other_pids) == 2,
              "the cluster script stopped every process it started (nodes, redis, nginx)" +
              (f" (still running: {left})" if left else ""))
        for p in left:
            os.kill(p, signal.SIGKILL)
        if failures:
            for dirpath, _, files in os.walk(state):
                for f in sorted(files):
                    if f.endswith(".log"):
                        log(f"--- {os.path.relpath(os.path.join(dirpath, f), state)} (tail)")
                        with open(os.path.join(dirpath, f), errors="replace") as fh:
                            print("".join(fh.readlines()[-15:]), flush=True)
        shutil.rmtree(state, ignore_errors=True)
    log(f"{'PASSED' if not failures else 'FAILED: ' + '; '.join(failures)}")
    print(f"cluster-test: {len(passed)} passed, {len(failures)} failed", flush=True)
    return 1 if failures else 0


T0 = time.monotonic()
if __name__ == "__main__":
    sys.exit(main())
