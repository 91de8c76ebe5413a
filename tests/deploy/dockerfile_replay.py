"""Replays the Dockerfile without a Docker engine, to prove its build steps are right.

There is no Docker engine on the test machines, so the image cannot be built. Instead this reads
the Dockerfile itself and performs its build stage with plain tools: the build context filtered
by .dockerignore (a COPY of an ignored path fails, as it would in Docker), COPY with the source
mtimes kept (as Docker does: that is what makes a stale stub build a real hazard), every RUN
through /bin/sh in a scratch file system, with this machine's cargo. Then it checks the runtime
stage against what the build produced, and runs the built binary the way the image would: with
only the image's ENV, as the image's USER, in a fresh network namespace so the image's own listen
address (0.0.0.0:8080) is free, and asks it /healthz and /readyz.

A stub binary left over from the dependency layer would fail the run (it serves nothing), so
this catches a broken dependency-caching trick, a target the stubs miss, an out-of-date
Cargo.lock, a .dockerignore that hides a needed file, and a non-working container default.

Usage: dockerfile_replay.py REPO_ROOT CACHE_DIR
CACHE_DIR keeps cargo's target directory between runs (dependencies compile once); every run
still builds the stub and the real `fanout` crate, as a fresh image build would.
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

failures = []


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what, flush=True)
    if not cond:
        failures.append(what)
    return cond


def parse_dockerfile(path):
    """(instruction, argument text, stage name) per instruction; continuations joined and
    comment lines dropped, as Docker's parser does."""
    out, buf, stage = [], "", None
    for raw in open(path):
        line = raw.rstrip("\n")
        if line.lstrip().startswith("#") or (not buf and not line.strip()):
            continue
        if line.endswith("\\"):
            buf += line[:-1]
            continue
        buf += line
        instr, _, args = buf.strip().partition(" ")
        instr = instr.upper()
        if instr == "FROM":
            m = re.search(r"\s+AS\s+(\S+)\s*$", args, re.I)
            stage = m.group(1) if m else None
        out.append((instr, args.strip(), stage))
        buf = ""
    return out


def dockerignore_matcher(root):
    """Docker's rule: the last matching pattern wins, `!` re-includes, a pattern matching a
    directory covers everything below it, `*` and `?` stop at `/`, `**` crosses it."""
    rules = []
    path = os.path.join(root, ".dockerignore")
    for line in open(path) if os.path.exists(path) else []:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        neg = line.startswith("!")
        pat = line[1:] if neg else line
        pat = os.path.normpath(pat.strip("/"))
        rx = ""
        i = 0
        while i < len(pat):
            if pat.startswith("**", i):
                rx += ".*"
                i += 2
            elif pat[i] == "*":
                rx += "[^/]*"
                i += 1
            elif pat[i] == "?":
                rx += "[^/]"
                i += 1
            else:
                rx += re.escape(pat[i])
                i += 1
        rules.append((neg, re.compile(rx + "$")))

    def ignored(rel):
        parts = os.path.normpath(rel).split("/")
        prefixes = ["/".join(parts[: k + 1]) for k in range(len(parts))]
        result = False
        for neg, rx in rules:
            if any(rx.match(p) for p in prefixes):
                result = not neg
        return result

    return ignored


def copy_tree_filtered(src_root, rel, dst, ignored):
    """COPY of one context path (file or directory), keeping mtimes, skipping ignored files."""
    src = os.path.join(src_root, rel)
    if os.path.isdir(src):
        os.makedirs(dst, exist_ok=True)
        for name in sorted(os.listdir(src)):
            child = os.path.join(rel, name)
            if not ignored(child):
                copy_tree_filtered(src_root, child, os.path.join(dst, name), ignored)
        shutil.copystat(src, dst)
    else:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copy2(src, dst)


def main():
    root, cache = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])
    instrs = parse_dockerfile(os.path.join(root, "Dockerfile"))
    ignored = dockerignore_matcher(root)
    froms = [(a, s) for i, a, s in instrs if i == "FROM"]
    check(len(froms) >= 2, f"multi-stage: {len(froms)} stages ({[a for a, _ in froms]})")
    build_stage = froms[0][1]
    runtime = [(i, a) for i, a, s in instrs if s == froms[-1][1] and i != "FROM"]
    final_from = froms[-1][0]

    # Absolute paths the build stage writes to (its WORKDIR, the runtime stage's COPY --from
    # sources) are mapped into the scratch file system.
    fs = tempfile.mkdtemp(prefix="fanout-dockerfile-replay.")
    os.chmod(fs, 0o755)  # the smoke run below executes the binary as the image's non-root user
    try:
        copies_from = [a for i, a in runtime if i == "COPY" and a.startswith(f"--from={build_stage} ")]
        check(len(copies_from) == 1, f"the runtime stage copies one artifact from '{build_stage}'")
        artifact_src, artifact_dst = copies_from[0].split()[1:3]
        tops = {artifact_src.split("/")[1]}
        workdir = "/"
        for instr, args, stage in instrs:
            if stage == build_stage and instr == "WORKDIR":
                tops.add(args.split("/")[1])
        remap = re.compile(r"(?<![\w./-])/(" + "|".join(map(re.escape, sorted(tops))) + r")\b")

        def host(p):
            return os.path.normpath(fs + (p if p.startswith("/") else os.path.join(workdir, p)))

        t0 = time.monotonic()
        for instr, args, stage in instrs:
            if stage != build_stage or instr == "FROM":
                continue
            if instr == "WORKDIR":
                workdir = args
                os.makedirs(host(workdir), exist_ok=True)
                # Dependencies stay compiled between replays; the stub and real crate do not.
                os.makedirs(cache, exist_ok=True)
                link = os.path.join(host(workdir), "target")
                if not os.path.lexists(link):
                    os.symlink(cache, link)
            elif instr == "COPY":
                words = shlex.split(args)
                srcs, dst = words[:-1], words[-1]
                for s in srcs:
                    present = os.path.exists(os.path.join(root, s))
                    if not check(present and not ignored(s),
                                 f"COPY {s}: in the build context and not excluded by .dockerignore"):
                        return 1
                    # Docker: a directory's contents go into dst; a file goes to dst, or into
                    # it when dst ends in "/" or there are several sources.
                    into = dst.endswith("/") or len(srcs) > 1
                    if os.path.isdir(os.path.join(root, s)) or not into:
                        target = host(dst)
                    else:
                        target = host(os.path.join(dst, os.path.basename(s)))
                    copy_tree_filtered(root, s, os.path.normpath(target), ignored)
            elif instr == "RUN":
                cmd = remap.sub(lambda m: fs + "/" + m.group(1), args)
                print(f"RUN {args[:60]} ...", flush=True)
                r = subprocess.run(["/bin/sh", "-c", cmd], cwd=host(workdir))
                if not check(r.returncode == 0, f"RUN step exits 0 ({args[:60]}...)"):
                    return 1
            elif instr in ("ENV", "ARG"):
                print(f"note: {instr} in the build stage is not replayed: {args}")
        print(f"build stage replayed in {time.monotonic() - t0:.0f} s", flush=True)

        binary = fs + artifact_src
        if not check(os.access(binary, os.X_OK), f"the build stage produced {artifact_src}"):
            return 1

        # The runtime stage: what it runs, as whom, with which defaults.
        env = {}
        for i, a in runtime:
            if i == "ENV":
                for k, v in re.findall(r'(\w+)=("[^"]*"|\S+)', a):
                    env[k] = v.strip('"')
        user = next((a for i, a in runtime if i == "USER"), "")
        exposed = [a.split("/")[0] for i, a in runtime if i == "EXPOSE"]
        entry = next((a for i, a in runtime if i == "ENTRYPOINT"), "")
        listen = env.get("FANOUT_LISTEN", "")
        check(bool(re.match(r"^\d+(:\d+)?$", user)) and user.split(":")[0] != "0",
              f"runs as a numeric non-root user (USER {user!r})")
        check(listen.startswith("0.0.0.0:"), f"listens on all interfaces in a container ({listen!r})")
        port = listen.rsplit(":", 1)[-1]
        check(port in exposed, f"EXPOSEs the listen port {port} (EXPOSE {exposed})")
        check(entry.startswith("[") and artifact_dst in entry,
              f"ENTRYPOINT (exec form) runs the copied binary {artifact_dst}")
        print(f"runtime base image: {final_from}")

        # The binary as the container would run it: only the image's ENV, as its USER, in a
        # network namespace of its own (so 0.0.0.0:8080 is free whatever else runs here).
        uid, _, gid = user.partition(":")
        envs = " ".join(shlex.quote(f"{k}={v}") for k, v in env.items())
        script = f"""
            ip link set lo up
            env -i {envs} setpriv --reuid={uid} --regid={gid or uid} --clear-groups \\
                {shlex.quote(binary)} >{fs}/run.out 2>{fs}/run.log &
            pid=$!
            ok=1
            for _ in $(seq 1 150); do
                curl -fsS http://127.0.0.1:{port}/healthz >/dev/null 2>&1 && ok=0 && break
                kill -0 $pid 2>/dev/null || break
                sleep 0.1
            done
            ready=$(curl -sS http://127.0.0.1:{port}/readyz 2>&1)
            owner=$(ps -o uid= -p $pid | tr -d ' ')
            # A second SIGTERM skips the drain (tested elsewhere); KILL only if that fails.
            kill -TERM $pid 2>/dev/null; sleep 0.2; kill -TERM $pid 2>/dev/null
            for _ in $(seq 1 100); do kill -0 $pid 2>/dev/null || break; sleep 0.1; done
            kill -KILL $pid 2>/dev/null
            wait $pid 2>/dev/null
            echo "healthz=$ok readyz=$ready uid=$owner"
            """
        if os.geteuid() != 0:
            check(False, "smoke run needs root (unshare --net, setpriv)")
            return 1
        r = subprocess.run(["unshare", "--net", "--", "bash", "-c", script],
                           capture_output=True, text=True, timeout=60)
        print(r.stdout.strip(), r.stderr.strip())
        check("healthz=0" in r.stdout, f"the built binary answers /healthz on {listen} with the image's ENV only")
        check("readyz=ready" in r.stdout, "and /readyz says ready (standalone, no Redis)")
        check(f"uid={uid}" in r.stdout, f"the process ran as uid {uid}")
        if failures and os.path.exists(f"{fs}/run.log"):
            print(open(f"{fs}/run.log").read()[-2000:])
        return 1 if failures else 0
    finally:
        shutil.rmtree(fs, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
