#!/usr/bin/env python3
"""Runs the Redis Cluster overlay's Job script (deploy/overlays/redis-cluster/cluster-create.sh)
against six local redis-server processes, as the Job runs it against the StatefulSet's pods.

Checks: with one node started late the script waits for it; it forms a cluster of three masters
with one replica each and every node reports cluster_state:ok; run again, it changes nothing (same
node ids, roles and epochs) and says so; and it fails, rather than waits forever, when a node never
answers. Nodes listen on free loopback ports and announce 127.0.0.1 (in Kubernetes: the pod IP).
Every process it starts is stopped by PID on exit and on Ctrl-C; files live in a temp dir.

Usage: tests/deploy/cluster_create_test.py      (exit 1 on failure; needs redis-server, redis-cli)
"""
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "deploy", "overlays", "redis-cluster", "cluster-create.sh")

procs = []


def stop_all(*_):
    for p in reversed(procs):
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    procs.clear()


def on_signal(signum, _frame):
    stop_all()
    sys.exit(128 + signum)


def free_port():
    # The cluster bus listens on port + 10000: pick ports whose bus port is free too.
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


def start_redis(port, workdir):
    d = os.path.join(workdir, str(port))
    os.makedirs(d)
    p = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", d, "--cluster-enabled", "yes",
         "--cluster-config-file", os.path.join(d, "nodes.conf"), "--cluster-node-timeout", "2000",
         "--cluster-announce-ip", "127.0.0.1", "--logfile", os.path.join(d, "redis.log")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs.append(p)
    return p


def cli(port, *args):
    return subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True,
                          timeout=10).stdout


def run_script(nodes, wait_seconds, timeout=120):
    env = dict(os.environ, REDIS_NODES=" ".join(nodes), REDIS_REPLICAS="1",
               WAIT_SECONDS=str(wait_seconds))
    r = subprocess.run(["sh", SCRIPT], env=env, capture_output=True, text=True, timeout=timeout)
    return r.returncode, r.stdout + r.stderr


def topology(port):
    """(node id, flags, config epoch) of every node, as one node sees them."""
    rows = []
    for line in cli(port, "cluster", "nodes").splitlines():
        f = line.split()
        flags = ",".join(x for x in f[2].split(",") if x != "myself")
        rows.append((f[0], flags, f[6]))
    return sorted(rows)


def main():
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    for tool in ("redis-server", "redis-cli"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is missing (apt-get install redis-server)")
    work = tempfile.mkdtemp(prefix="fanout-cluster-create.")
    failures = []
    try:
        ports = [free_port() for _ in range(6)]
        nodes = [f"127.0.0.1:{p}" for p in ports]
        for port in ports[:5]:
            start_redis(port, work)
        # The last node comes up 3 s late, as a pod scheduled late would: the script waits.
        late = subprocess.Popen(["sh", "-c", "sleep 3"])
        procs.append(late)
        env = dict(os.environ, REDIS_NODES=" ".join(nodes), REDIS_REPLICAS="1", WAIT_SECONDS="60")
        job = subprocess.Popen(["sh", SCRIPT], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
        procs.append(job)
        late.wait()
        start_redis(ports[5], work)
        out, _ = job.communicate(timeout=120)
        if job.returncode != 0:
            failures.append(f"first run exited {job.returncode}:\n{out}")
        states = {p: cli(p, "cluster", "info") for p in ports}
        bad = [p for p, s in states.items() if "cluster_state:ok" not in s]
        if bad:
            failures.append(f"cluster_state is not ok on ports {bad}")
        # The script waited for `redis-cli --cluster check`: every node has the same view.
        topo = topology(ports[0])
        if any(topology(p) != topo for p in ports[1:]):
            failures.append("the nodes disagree about the cluster after the script returned")
        masters = [t for t in topo if "master" in t[1]]
        replicas = [t for t in topo if "slave" in t[1]]
        if (len(masters), len(replicas)) != (3, 3):
            failures.append(f"want 3 masters and 3 replicas, got {topo}")
        code, out2 = run_script(nodes, 30)
        if code != 0 or "nothing to create" not in out2:
            failures.append(f"second run: exit {code}, output:\n{out2}")
        if topology(ports[0]) != topo:
            failures.append("the second run changed the cluster")
        # A node that never answers: the script gives up after WAIT_SECONDS, with a reason.
        dead = f"127.0.0.1:{free_port()}"
        code, out3 = run_script(nodes + [dead], 3, timeout=60)
        if code == 0 or "did not answer" not in out3:
            failures.append(f"unreachable node: exit {code}, output:\n{out3}")
    finally:
        stop_all()
        shutil.rmtree(work, ignore_errors=True)
    if failures:
        print("cluster-create.sh: FAILED\n  " + "\n  ".join(failures))
        return 1
    print("cluster-create.sh: formed 3 masters + 3 replicas, second run changed nothing, "
          "an unreachable node fails the run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
