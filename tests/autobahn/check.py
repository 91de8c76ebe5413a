#!/usr/bin/env python3
"""The verdict of an Autobahn|Testsuite fuzzingclient run (index.json + per-case JSON).

usage: check.py REPORT_DIR ALLOWED_TXT [--complete]

Prints, as Markdown: the counts per behaviour and per section, every case that is not OK with
what Autobahn expected and observed, and the section-9 durations. Exits 0 only if every case has
behavior OK and behaviorClose OK, except the cases of ALLOWED_TXT, each of which must have exactly
the result listed there. --complete also requires every case of sections 1-13 to have run (a
wstest that stopped half-way must not pass).

ALLOWED_TXT: one case per line, `CASE BEHAVIOR[/BEHAVIORCLOSE] reason...` (behaviorClose OK
when omitted); `#` starts a comment. UNIMPLEMENTED is refused for 12.*/13.*: fanout must
implement permessage-deflate, not be excused from it.
"""
import collections
import json
import os
import sys

SECTIONS = collections.OrderedDict([
    ("1", "framing"), ("2", "pings/pongs"), ("3", "reserved bits"), ("4", "opcodes"),
    ("5", "fragmentation"), ("6", "UTF-8"), ("7", "close handshake"),
    ("9", "limits/performance"), ("10", "misc"), ("12", "permessage-deflate (compression)"),
    ("13", "permessage-deflate (parameters)"),
])
# Cases per section in autobahntestsuite 25.10.1 (the cases of 0.8.2).
EXPECTED = {"1": 16, "2": 11, "3": 7, "4": 10, "5": 20, "6": 145, "7": 37, "9": 54, "10": 1,
            "12": 90, "13": 126}
BEHAVIORS = ["OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED", "WRONG CODE", "UNCLEAN"]


def key(cid):
    return [int(x) for x in cid.split(".")]


def load_allowed(path):
    """{case: (behavior, behaviorClose, reason)}; a malformed file is an error, not a pass."""
    allowed, errors = {}, []
    for n, line in enumerate(open(path), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split(None, 2)
        if len(parts) < 3:
            errors.append("%s:%d: want `CASE BEHAVIOR[/BEHAVIORCLOSE] reason`, got %r" % (path, n, line))
            continue
        case, result, reason = parts
        beh, _, close = result.partition("/")
        close = close or "OK"
        if beh not in BEHAVIORS or close not in BEHAVIORS:
            errors.append("%s:%d: unknown behaviour %r" % (path, n, result))
        elif case.split(".")[0] in ("12", "13") and beh == "UNIMPLEMENTED":
            errors.append("%s:%d: %s may not be allowed UNIMPLEMENTED: permessage-deflate is required"
                          % (path, n, case))
        elif case in allowed:
            errors.append("%s:%d: %s listed twice" % (path, n, case))
        else:
            allowed[case] = (beh, close, reason)
    return allowed, errors


def one_line(v, limit):
    s = v if isinstance(v, str) else json.dumps(v)
    s = " ".join(s.split())
    return s if len(s) <= limit else s[:limit] + "..."


def main(argv):
    if len(argv) < 3:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    outdir, allowed_path = argv[1], argv[2]
    complete = "--complete" in argv[3:]
    allowed, problems = load_allowed(allowed_path)
    try:
        idx = json.load(open(os.path.join(outdir, "index.json")))
    except (OSError, ValueError) as e:
        print("no usable report in %s: %s" % (outdir, e))
        return 1
    if list(idx) != ["fanout"]:
        problems.append("report has agents %s, expected only fanout" % sorted(idx))
    cases = idx.get("fanout", {})
    ids = sorted(cases, key=key)

    beh = collections.Counter(cases[c]["behavior"] for c in ids)
    behc = collections.Counter(cases[c]["behaviorClose"] for c in ids)
    print("## Autobahn|Testsuite: fanout, %d cases" % len(ids))
    print()
    print("behavior:      " + ", ".join("%s=%d" % kv for kv in sorted(beh.items())))
    print("behaviorClose: " + ", ".join("%s=%d" % kv for kv in sorted(behc.items())))

    per = collections.OrderedDict((s, collections.Counter()) for s in SECTIONS)
    for c in ids:
        per.setdefault(c.split(".")[0], collections.Counter())[cases[c]["behavior"]] += 1
    cols = ["OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED", "WRONG CODE", "UNCLEAN"]
    print()
    print("| section | cases | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 2) + "|")
    for s, cnt in per.items():
        n = sum(cnt.values())
        if n == 0 and not complete:
            continue  # a subset run (AB_CASES): only the sections that ran
        print("| %s %s | %d | %s |" % (s, SECTIONS.get(s, ""), n, " | ".join(str(cnt.get(b, 0)) for b in cols)))
        if complete and n != EXPECTED.get(s, n):
            problems.append("section %s ran %d cases, expected %d" % (s, n, EXPECTED[s]))

    failing, excused = [], []
    for c in ids:
        r = cases[c]
        got = (r["behavior"], r["behaviorClose"])
        if got == ("OK", "OK"):
            if c in allowed:
                excused.append("- %s: now OK; remove it from allowed.txt" % c)
            continue
        if c in allowed and allowed[c][:2] == got:
            excused.append("- %s: %s/%s (allowed: %s)" % (c, got[0], got[1], allowed[c][2]))
        else:
            failing.append(c)
    for c in sorted(set(allowed) - set(cases), key=key):
        if not complete:
            continue
        problems.append("allowed case %s did not run" % c)

    print()
    print("### allowed results (allowed.txt)")
    print("\n".join(excused) if excused else "(none)")
    print()
    print("### failing cases: %d" % len(failing))
    cur = None
    for c in failing:
        r = cases[c]
        s = c.split(".")[0]
        if s != cur:
            cur = s
            print("\n#### section %s (%s)" % (s, SECTIONS.get(s, "")))
        try:
            d = json.load(open(os.path.join(outdir, r["reportfile"])))
        except (OSError, ValueError, KeyError):
            d = {}
        note = ""
        if c in allowed:
            note = " (allowed.txt expects %s/%s)" % allowed[c][:2]
        print("- %s: behavior=%s behaviorClose=%s duration=%sms remoteCloseCode=%s%s"
              % (c, r["behavior"], r["behaviorClose"], r.get("duration"), r.get("remoteCloseCode"), note))
        if r["behavior"] == "UNIMPLEMENTED" and r["behaviorClose"] == "OK":
            # The server declined the extension; the details say nothing more than that.
            continue
        print("  description: %s" % one_line(d.get("description", ""), 300))
        print("  expectation: %s" % one_line(d.get("expectation", ""), 300))
        print("  result: %s" % one_line(str(d.get("result", "")), 300))
        print("  resultClose: %s" % one_line(str(d.get("resultClose", "")), 300))
        print("  expected: %s" % one_line(d.get("expected"), 300))
        print("  observed: %s" % one_line(d.get("received"), 300))

    nine = [c for c in ids if c.startswith("9.")]
    if nine:
        print()
        print("### section 9 durations (ms)")
        print("| case | behavior | duration ms |")
        print("|---|---|---|")
        for c in nine:
            print("| %s | %s | %s |" % (c, cases[c]["behavior"], cases[c].get("duration")))

    print()
    for p in problems:
        print("problem: " + p)
    ok = not failing and not problems
    print("autobahn verdict: %s (%d cases, %d failing, %d allowed, %d problems)"
          % ("PASS" if ok else "FAIL", len(ids), len(failing),
             len([e for e in excused if "now OK" not in e]), len(problems)))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
