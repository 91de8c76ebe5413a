// End-to-end test of the chat page at / and of the browser client it is built on (/fanout.js),
// in real headless Chromium: one redis-server and two fanout nodes sharing it, page A on node 1
// and page B on node 2, both with a configuration file that gives every channel history and
// presence (but `plain:*`); a third, standalone node for what Redis would hide (an epoch lost
// with the node, a node with no configuration at all). Every process started here is stopped
// by PID, also on failure, on SIGINT/SIGTERM and when the watchdog fires.
//
// Screenshots (laptop and phone size, both pages) go to target/browser/ (or $BROWSER_ARTIFACTS);
// with UPDATE_SCREENSHOTS=1 the README's screenshots in tests/browser/screenshots/ are rewritten.
import { execFile, spawn } from "node:child_process";
import { createHash, createHmac } from "node:crypto";
import { closeSync, copyFileSync, mkdirSync, openSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import { createConnection, createServer } from "node:net";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const here = dirname(fileURLToPath(import.meta.url));
const root = join(here, "..", "..");
const FANOUT = process.env.FANOUT_BIN || join(root, "target", "release", "fanout");
const CHROMIUM = process.env.CHROMIUM_BIN || "/usr/bin/chromium";
const artifacts = process.env.BROWSER_ARTIFACTS || join(root, "target", "browser");
const updateScreenshots = process.env.UPDATE_SCREENSHOTS === "1";
const LAPTOP = { width: 1280, height: 800 };
const PHONE = { width: 390, height: 780 };
const WATCHDOG_MS = 240_000;
mkdirSync(artifacts, { recursive: true });

const children = new Set();
let passed = 0, failed = 0;
let browser = null;

// ---------- processes ----------

function start(name, cmd, args) {
  const log = openSync(join(artifacts, `${name}.log`), "w");
  const child = spawn(cmd, args, { stdio: ["ignore", "pipe", log] });
  closeSync(log);
  child.label = name;
  children.add(child);
  child.on("exit", () => children.delete(child));
  child.stdout.setEncoding("utf8");
  return child;
}

function stop(child, signal = "SIGTERM", ms = 8000) {
  return new Promise((resolve) => {
    if (child.exitCode !== null || child.signalCode !== null) return resolve(child.exitCode);
    const t = setTimeout(() => child.kill("SIGKILL"), ms);
    child.once("exit", (code) => { clearTimeout(t); resolve(code); });
    child.kill(signal);
  });
}

async function cleanup() {
  if (browser) await browser.close().catch(() => {});
  browser = null;
  for (const c of [...children]) await stop(c, "SIGKILL", 2000);
}

// Synchronous, so it also runs from process.exit() and before any await on a signal.
function killAll() {
  for (const c of children) { try { c.kill("SIGKILL"); } catch { /* already gone */ } }
}
process.on("exit", killAll);
for (const sig of ["SIGINT", "SIGTERM"]) {
  process.on(sig, async () => { console.log(`browser: interrupted by ${sig}`); killAll(); await cleanup(); process.exit(1); });
}
setTimeout(async () => {
  console.log(`FAIL watchdog: the test did not finish within ${WATCHDOG_MS / 1000} s`);
  await cleanup();
  process.exit(1);
}, WATCHDOG_MS).unref();

function freePort() {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.listen(0, "127.0.0.1", () => { const p = s.address().port; s.close(() => resolve(p)); });
    s.on("error", reject);
  });
}

function waitPort(port, ms = 10000) {
  const until = Date.now() + ms;
  return new Promise((resolve, reject) => {
    const tryOnce = () => {
      const c = createConnection(port, "127.0.0.1");
      c.on("connect", () => { c.destroy(); resolve(); });
      c.on("error", () => (Date.now() > until ? reject(new Error(`port ${port} never opened`)) : setTimeout(tryOnce, 50)));
    };
    tryOnce();
  });
}

const TOKEN_SECRET = "browser-test-secret-0123456789";

// An HS256 JWT, minted the way an application backend would.
function mintToken(claims) {
  const b64 = (x) => Buffer.from(JSON.stringify(x)).toString("base64url");
  const body = `${b64({ alg: "HS256", typ: "JWT" })}.${b64(claims)}`;
  return `${body}.${createHmac("sha256", TOKEN_SECRET).update(body).digest("base64url")}`;
}

const API_KEY = "browser-test-api-key-0123456789";

// The chat's namespaces: `locked:*` refuses clients (to see error replies reject), every other
// channel keeps history and presence. (A node without this file is the case of no history.)
const CONFIG = `
[[namespace]]
name = "locked:*"
subscribe = "token"
publish = "server"

[[namespace]]
name = "*"
history_size = 100
history_ttl = 300
presence = true
`;
const configFile = join(artifacts, "browser.toml");
writeFileSync(configFile, CONFIG);

// A node on `listen`; with Redis when redisPort is given, standalone otherwise; with the
// configuration file unless config is false; with the server API when api is true.
function startNode(name, listen, { redisPort = null, config = true, api = false } = {}) {
  const child = start(name, FANOUT, ["--listen", listen, "--threads", "2",
    ...(redisPort ? ["--redis", `redis://127.0.0.1:${redisPort}`] : []),
    ...(config ? ["--config", configFile] : []),
    ...(api ? ["--api-listen", "127.0.0.1:0", "--api-key", API_KEY] : []),
    // Tokens are optional (--auth off) but checked when given: some pages below come with one.
    "--token-hmac-secret", TOKEN_SECRET,
    "--drain-delay", "0", "--drain-time", "0.5", "--log-level", "info",
    // Chromium offers permessage-deflate: every message of this test travels compressed, both
    // ways (a 0-byte minimum so the server compresses even short chat lines).
    "--compression", "on", "--compression-min-bytes", "0"]);
  return new Promise((resolve, reject) => {
    let buf = "";
    const timer = setTimeout(() => reject(new Error(`${name} did not print its address within 15 s`)), 15000);
    child.stdout.on("data", (d) => {
      buf += d;
      const m = buf.match(/^listening on (\S+)/m);
      const a = buf.match(/^api listening on (\S+)/m);
      if (m && (!api || a)) { clearTimeout(timer); resolve({ child, addr: m[1], api: a ? a[1] : null }); }
    });
    child.once("exit", (code) => { clearTimeout(timer); reject(new Error(`${name} exited early (${code}); see ${name}.log`)); });
  });
}

async function api(node, path, body) {
  const res = await fetch(`http://${node.api}${path}`, {
    method: "POST",
    headers: { Authorization: `apikey ${API_KEY}`, "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  if (res.status !== 200) throw new Error(`${path}: ${res.status} ${await res.text()}`);
  return res.json();
}

let redisPort = 0;
function redisCli(...args) {
  return new Promise((resolve, reject) => {
    execFile("redis-cli", ["-p", String(redisPort), ...args], { timeout: 5000 }, (err, out) => (err ? reject(err) : resolve(out)));
  });
}

// The JSON `ok` to a subscribe does not wait for Redis, so before a cross-node delivery is
// expected, wait until Redis itself lists enough subscribers (one per node with a local client).
async function redisSubscribers(channel) {
  const out = (await redisCli("PUBSUB", "NUMSUB", channel)).trim().split("\n");
  return Number(out[1]);
}
async function waitSubscribers(channel, test, what) {
  await waitFor(`Redis subscribers of ${channel} ${what}`, async () => test(await redisSubscribers(channel)), 15000);
}

// ---------- page helpers ----------

async function check(name, fn) {
  const t0 = Date.now();
  try { await fn(); passed++; console.log(`ok   ${name} (${((Date.now() - t0) / 1000).toFixed(1)} s)`); }
  catch (e) { failed++; console.log(`FAIL ${name}: ${e.message}`); }
}

async function waitFor(what, fn, ms = 10000) {
  const until = Date.now() + ms;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > until) throw new Error(`timed out after ${ms / 1000} s waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

function messages(page) {
  return page.$$eval("[data-testid=message]", (els) => els.map((e) => ({
    author: e.querySelector("[data-testid=author]").textContent,
    text: e.querySelector("[data-testid=text]").textContent,
    kind: e.dataset.kind,
    mine: e.classList.contains("mine"),
  })));
}
const findMessage = (page, text) => async () => (await messages(page)).find((m) => m.text === text);
const connState = (page) => page.$eval("[data-testid=conn-state]", (e) => e.dataset.state);
const waitOpen = (page, ms = 15000) => waitFor("connected state", async () => (await connState(page)) === "open", ms);
const unread = (page, ch) => page.$eval(`[data-testid=channel][data-channel="${ch}"] [data-testid=unread]`, (e) => (e.hidden ? 0 : Number(e.textContent)));
const channelList = (page) => page.$$eval("[data-testid=channel]", (els) => els.map((e) => e.dataset.channel));
const activeChannel = (page) => page.$eval("[data-testid=active-channel]", (e) => e.textContent.replace(/^#/, ""));

async function say(page, text) {
  await page.fill("[data-testid=message-input]", text);
  await page.press("[data-testid=message-input]", "Enter");
}
async function joinChannel(page, ch) {
  await page.fill("[data-testid=join-input]", ch);
  await page.press("[data-testid=join-input]", "Enter");
  await waitFor(`#${ch} active`, async () => (await activeChannel(page)) === ch);
}
async function openChannel(page, ch) {
  await page.click(`[data-testid=channel][data-channel="${ch}"] button`);
  await waitFor(`#${ch} active`, async () => (await activeChannel(page)) === ch);
}

// Records what a page's WebSockets sent and received, to prove what did NOT arrive.
function recordFrames(page) {
  const frames = { sent: [], received: [] };
  page.on("websocket", (ws) => {
    ws.on("framesent", (f) => frames.sent.push(String(f.payload)));
    ws.on("framereceived", (f) => frames.received.push(String(f.payload)));
  });
  return frames;
}

async function waitFrame(frames, pred) {
  return waitFor("a WebSocket message", () => frames.received.map((f) => JSON.parse(f)).find((m) => m.op === "message" && pred(m)));
}

// Who a page lists as online in its active channel: names of signed-in users, and the count
// of anonymous clients; null while the list is hidden (the channel has no presence).
async function online(page) {
  return page.evaluate(() => {
    const box = document.querySelector("[data-testid=online]");
    if (box.hidden) return null;
    const users = [...box.querySelectorAll("[data-testid=online-user] .name")].map((e) => e.textContent);
    const g = box.querySelector("[data-testid=online-guests]");
    return { users, guests: g ? Number(g.dataset.count) : 0 };
  });
}

const texts = async (page) => (await messages(page)).map((m) => m.text);
const parsed = (frames) => frames.map((f) => { try { return JSON.parse(f); } catch { return null; } }).filter(Boolean);

// A page on a node's origin that is not the chat page (its /healthz), with the node's
// /fanout.js imported as window.fanout: for scripted clients and for testing the module itself.
async function toolPage(node, errors) {
  const p = await (await browser.newContext()).newPage();
  p.on("pageerror", (e) => errors.push(`tool: ${e.message}`));
  await p.goto(`http://${node.addr}/healthz`);
  await p.evaluate(async () => { window.fanout = await import("/fanout.js"); });
  return p;
}

// Publishes each text as a chat message from `user`, one after the other, each only once the
// previous one was acknowledged (so they are in the channel in this order).
// `node` picks another node than the tool page's own; `gapMs` spreads the publishes out.
async function publishAll(tool, channel, list, { node = null, gapMs = 0, user = "tina" } = {}) {
  const url = node ? `ws://${node.addr}/ws` : null;
  await tool.evaluate(async ({ channel, list, user, url, gapMs }) => {
    const c = window.fanout.connect({ url });
    await c.whenOpen();
    for (const text of list) {
      await c.publish(channel, { user, text, ts: Date.now() });
      if (gapMs) await new Promise((r) => setTimeout(r, gapMs));
    }
    c.close();
  }, { channel, list, user, url, gapMs });
}

// The subscribe B last sent for a channel among `sent`, and the reply it got.
function lastSubscribe(frames, channel, from = 0) {
  const req = parsed(frames.sent.slice(from)).filter((m) => m.op === "subscribe" && m.channel === channel).at(-1);
  const reply = req && parsed(frames.received).find((m) => m.id === req.id && (m.op === "ok" || m.op === "error"));
  return { req, reply };
}

// The texts of chat messages delivered live on a channel among received frames.
const deliveredTexts = (frames, channel, from = 0) =>
  parsed(frames.received.slice(from)).filter((m) => m.op === "message" && m.channel === channel).map((m) => m.data?.text);

async function shoot(page, file, committed) {
  await page.screenshot({ path: join(artifacts, file) });
  if (updateScreenshots && committed) copyFileSync(join(artifacts, file), join(here, "screenshots", committed));
}

// ---------- the test ----------

try {
  redisPort = await freePort();
  start("redis", "redis-server", ["--port", String(redisPort), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]);
  await waitPort(redisPort);
  const n1 = await startNode("node1", "127.0.0.1:0", { redisPort, api: true });
  let n2 = await startNode("node2", "127.0.0.1:0", { redisPort });

  await check("the page at / is the embedded chat page and its CSP hash matches its script", async () => {
    const res = await fetch(`http://${n1.addr}/`);
    if (res.status !== 200 || !res.headers.get("content-type").startsWith("text/html")) throw new Error(`${res.status} ${res.headers.get("content-type")}`);
    const html = await res.text();
    const script = html.match(/<script type="module">([\s\S]*?)<\/script>/)[1];
    const hash = `'sha256-${createHash("sha256").update(script).digest("base64")}'`;
    const csp = html.match(/http-equiv="Content-Security-Policy" content="([^"]*)"/);
    if (!csp || !csp[1].includes(hash)) throw new Error(`the page's CSP must allow its script: put ${hash} in script-src of src/web/index.html`);
  });

  await check("GET /fanout.js is the embedded browser client: a JavaScript module with no imports", async () => {
    const res = await fetch(`http://${n1.addr}/fanout.js`);
    const type = res.headers.get("content-type");
    if (res.status !== 200 || type !== "text/javascript; charset=utf-8") throw new Error(`${res.status} ${type}`);
    if (res.headers.get("x-content-type-options") !== "nosniff") throw new Error("no X-Content-Type-Options: nosniff");
    const js = await res.text();
    if (!/^export function connect\(/m.test(js)) throw new Error("the module exports no connect()");
    // No build step and no external assets: the module imports nothing and loads nothing else.
    if (/^\s*import\s/m.test(js) || /\bimport\s*\(/.test(js) || /https?:\/\//.test(js)) throw new Error("fanout.js imports or names another resource");
    const head = await fetch(`http://${n1.addr}/fanout.js`, { method: "HEAD" });
    if (head.status !== 200 || Number(head.headers.get("content-length")) !== Buffer.byteLength(js)) throw new Error(`HEAD: ${head.status} ${head.headers.get("content-length")}`);
  });

  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    // Our own handlers stop everything; Playwright's would exit before the nodes are killed.
    handleSIGINT: false,
    handleSIGTERM: false,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
      "--disable-quic", "--no-first-run", "--disable-component-update", "--disable-sync"],
  });
  // One context (window) per user: two tabs of one window would leave one in the background,
  // where Chromium throttles timers and animation frames like a hidden tab.
  const a = await (await browser.newContext({ viewport: LAPTOP })).newPage();
  const b = await (await browser.newContext({ viewport: LAPTOP })).newPage();
  const bFrames = recordFrames(b);
  const dialogs = [], pageErrors = [];
  for (const [label, p] of [["A", a], ["B", b]]) {
    p.on("dialog", (d) => { dialogs.push(`${label}: ${d.message()}`); d.dismiss().catch(() => {}); });
    p.on("pageerror", (e) => pageErrors.push(`${label}: ${e.message}`));
    p.on("console", (m) => { if (m.type() === "error" && /Content Security Policy/.test(m.text())) pageErrors.push(`${label}: ${m.text()}`); });
  }
  await a.goto(`http://${n1.addr}/?name=ana&channel=room1`);
  await b.goto(`http://${n2.addr}/?name=bob&channel=room1`);
  await waitOpen(a);
  await waitOpen(b);
  await waitSubscribers("room1", (n) => n >= 2, "to reach 2 (one per node)");
  const tool = await toolPage(n1, pageErrors);

  await check("fanout.js: the reconnect delay is full jitter under a doubling ceiling with a cap", async () => {
    const rows = await tool.evaluate(() => {
      const opts = { baseDelay: 100, maxDelay: 1600 };
      return Array.from({ length: 8 }, (_, attempt) => {
        const xs = Array.from({ length: 400 }, () => window.fanout.backoffDelay(attempt, opts));
        return { attempt, min: Math.min(...xs), max: Math.max(...xs), distinct: new Set(xs).size };
      });
    });
    for (const r of rows) {
      const ceiling = Math.min(1600, 100 * 2 ** r.attempt);
      // 400 uniform draws: the chance that none lands in the top or bottom tenth is 0.9^400.
      if (r.min < 0 || r.max >= ceiling) throw new Error(`attempt ${r.attempt}: delays ${r.min}..${r.max} outside [0, ${ceiling})`);
      if (r.max < 0.9 * ceiling || r.min > 0.1 * ceiling || r.distinct < 50) throw new Error(`attempt ${r.attempt}: not spread over [0, ${ceiling}): ${JSON.stringify(r)}`);
    }
  });

  await check("fanout.js: against a dead port it retries with growing, jittered waits and really waits them", async () => {
    const dead = await freePort();
    const events = await tool.evaluate(async (url) => {
      const events = [];
      const c = window.fanout.connect({ url, baseDelay: 40, maxDelay: 320,
        onState: (state, info) => events.push({ state, t: performance.now(), retryIn: info.retryIn, final: info.final }) });
      while (events.filter((e) => e.state === "connecting").length < 9) await new Promise((r) => setTimeout(r, 20));
      c.close();
      return events;
    }, `ws://127.0.0.1:${dead}/ws`);
    const waits = [];
    for (let i = 0; i + 1 < events.length; i++) {
      const e = events[i];
      if (e.state !== "closed" || e.final) continue;
      const next = events[i + 1];
      if (next.final) break; // close() came during the last wait
      if (next.state !== "connecting") throw new Error(`after a wait came ${next.state}`);
      const ceiling = Math.min(320, 40 * 2 ** waits.length);
      if (!(e.retryIn >= 0 && e.retryIn < ceiling)) throw new Error(`wait #${waits.length} is ${e.retryIn} ms, outside [0, ${ceiling})`);
      // Chromium may run a timer a millisecond or two early (its clocks and timer slack), so
      // some slack; a client that did not wait would come back within a millisecond.
      if (next.t - e.t < e.retryIn * 0.95 - 2) throw new Error(`wait #${waits.length}: reconnected after ${next.t - e.t} ms, announced ${e.retryIn}`);
      waits.push(e.retryIn / ceiling);
    }
    if (waits.length < 8) throw new Error(`only ${waits.length} waits in ${JSON.stringify(events)}`);
    if (new Set(waits.map((f) => f.toFixed(3))).size < 2) throw new Error(`every wait is the same fraction of its ceiling: no jitter (${waits})`);
    if (events.at(-1).state !== "closed" || !events.at(-1).final) throw new Error("close() did not end it for good");
  });

  await check("fanout.js: publish resolves on the ok, error replies reject with the server's words, ids match replies", async () => {
    const r = await tool.evaluate(async () => {
      const c = window.fanout.connect({});
      await c.whenOpen();
      const got = [];
      const sub = c.subscribe("unit:acks", { onMessage: (m) => got.push(m.data) });
      const ok = await sub.ready;
      const acks = await Promise.all(Array.from({ length: 20 }, (_, i) => c.publish("unit:acks", { n: i })));
      const reject = async (p) => { try { await p; return null; } catch (e) { return { name: e.name, code: e.code, message: e.message }; } };
      const publishRefused = await reject(c.publish("locked:news", "hi"));
      let onError = null;
      const locked = c.subscribe("locked:news", { onError: (e) => { onError = e.message; } });
      const subscribeRefused = await reject(locked.ready);
      while (got.length < 20) await new Promise((r) => setTimeout(r, 20));
      c.close();
      const afterClose = await reject(c.publish("unit:acks", 1));
      return { ok, acks, got, publishRefused, subscribeRefused, onError, lockedState: locked.state, kept: !!c.subscription("locked:news"), afterClose };
    });
    if (r.ok.op !== "ok" || r.acks.some((a) => a.op !== "ok")) throw new Error(`replies ${JSON.stringify([r.ok, r.acks[0]])}`);
    // Each publish got its own reply: the ids are distinct, so the promises matched replies by id.
    if (new Set(r.acks.map((a) => a.id)).size !== 20) throw new Error(`ack ids ${r.acks.map((a) => a.id)}`);
    if (r.got.map((d) => d.n).join() !== [...Array(20).keys()].join()) throw new Error(`delivered ${JSON.stringify(r.got)}`);
    if (r.publishRefused?.code !== "server" || !/forbidden/.test(r.publishRefused.message)) throw new Error(`publish to locked:news: ${JSON.stringify(r.publishRefused)}`);
    if (r.subscribeRefused?.code !== "server" || !/forbidden/.test(r.subscribeRefused.message) || r.onError !== r.subscribeRefused.message) throw new Error(`subscribe to locked:news: ${JSON.stringify(r)}`);
    if (r.lockedState !== "failed" || r.kept) throw new Error("a refused subscription is kept (it would be sent again on every reconnect)");
    if (r.afterClose?.code !== "disconnected") throw new Error(`publish after close: ${JSON.stringify(r.afterClose)}`);
  });

  await check("fanout.js: a subscribe the node cannot serve yet (its Redis is down) is retried until it works; a publish in flight when the link drops is rejected, not resent", async () => {
    const latePort = await freePort();
    const n4 = await startNode("node4", "127.0.0.1:0", { redisPort: latePort });
    let late = null;
    try {
      const errors = await tool.evaluate(async (url) => {
        const errors = [];
        window.retryClient = window.fanout.connect({ url, baseDelay: 50, maxDelay: 400 });
        await window.retryClient.whenOpen();
        window.retrySub = window.retryClient.subscribe("retry:1", { onError: (e) => errors.push({ message: e.message, retrying: e.retrying }) });
        while (errors.length < 2) await new Promise((r) => setTimeout(r, 20));
        return errors;
      }, `ws://${n4.addr}/ws`);
      if (errors.some((e) => !e.retrying)) throw new Error(`a transient error dropped the subscription: ${JSON.stringify(errors)}`);
      late = start("redis-late", "redis-server", ["--port", String(latePort), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]);
      await waitPort(latePort);
      const r = await tool.evaluate(async () => {
        const ok = await window.retrySub.ready;
        const got = new Promise((resolve) => { window.retrySub._handlers.onMessage = (m) => resolve(m.data); });
        await window.retryClient.publish("retry:1", "made it");
        const data = await got;
        window.retryClient.close();
        return { ok, data, state: window.retrySub.state };
      });
      if (typeof r.ok.epoch !== "string" || r.data !== "made it") throw new Error(JSON.stringify(r));

      // A publish in flight when the connection drops: the node is frozen (SIGSTOP) so the
      // publish is sent but never answered, then killed.
      await tool.evaluate(async (url) => {
        window.flightStates = [];
        window.flightClient = window.fanout.connect({ url, baseDelay: 50, maxDelay: 400, onState: (s, i) => window.flightStates.push({ s, final: i.final }) });
        await window.flightClient.whenOpen();
      }, `ws://${n4.addr}/ws`);
      process.kill(n4.child.pid, "SIGSTOP");
      // kill() returns before every thread has stopped; on a busy machine a reactor could
      // still answer. Wait until /proc shows each thread stopped ("T").
      await waitFor("node 4's threads to stop", () => {
        const tasks = readdirSync(`/proc/${n4.child.pid}/task`);
        return tasks.every((t) => /^\d+ \(.*\) T /.test(readFileSync(`/proc/${n4.child.pid}/task/${t}/stat`, "utf8")));
      });
      await tool.evaluate(() => {
        window.flight = window.flightClient.publish("retry:2", "in flight").then((r) => ({ resolved: r }), (e) => ({ code: e.code }));
      });
      await stop(n4.child, "SIGKILL");
      const outcome = await tool.evaluate(() => window.flight);
      if (outcome.code !== "disconnected") throw new Error(`the in-flight publish ended ${JSON.stringify(outcome)}`);
      const n4b = await startNode("node4-restarted", n4.addr, { redisPort: latePort });
      n4.child = n4b.child;
      const after = await tool.evaluate(async () => {
        await window.flightClient.whenOpen();
        // The restarted node takes WebSockets before its Redis link is up; until then it
        // answers "history unavailable".
        let h;
        for (let i = 0; !h; i++) {
          try { h = await window.flightClient.history("retry:2"); } catch (e) { if (i > 200) throw e; await new Promise((r) => setTimeout(r, 50)); }
        }
        window.flightClient.close();
        return { messages: h.messages, states: window.flightStates };
      });
      // Not sent again by the client on its own: the channel's history has nothing.
      if (after.messages.length !== 0) throw new Error(`retry:2 holds ${JSON.stringify(after.messages)}`);
      if (after.states.some((e) => e.final && e.s === "closed" && after.states.at(-1) !== e)) throw new Error(`the client gave up: ${JSON.stringify(after.states)}`);
    } finally {
      await stop(n4.child);
      if (late) await stop(late);
    }
  });

  await check("fanout.js: 4002 from the server API ends it for good; 4001 without getToken too; getToken's refresh keeps it open", async () => {
    const now = Math.floor(Date.now() / 1000);
    const tokens = {
      banned: mintToken({ sub: "u40", exp: now + 600 }),
      // Expires in 1 s: the server closes it 4001 once the 5 s of leeway are over.
      short: mintToken({ sub: "u41", exp: now + 1 }),
      fresh: [mintToken({ sub: "u41", exp: now + 600 }), mintToken({ sub: "u41", exp: now + 600 })],
    };
    await tool.evaluate((tokens) => {
      const log = (name) => (state, info) => window.unitStates[name].push({ state, code: info.code, final: info.final });
      window.unitStates = { banned: [], expiring: [], refreshed: [] };
      const opts = { baseDelay: 20, maxDelay: 100 };
      window.unitClients = {
        banned: window.fanout.connect({ ...opts, token: tokens.banned, onState: log("banned") }),
        expiring: window.fanout.connect({ ...opts, token: tokens.short, onState: log("expiring") }),
        refreshed: window.fanout.connect({ ...opts, token: tokens.short, onState: log("refreshed"), getToken: () => tokens.fresh.shift() }),
      };
      return Promise.all(Object.values(window.unitClients).map((c) => c.whenOpen()));
    }, tokens);
    const closed = await api(n1, "/api/disconnect", { user: "u40" });
    if (closed.closed !== 1) throw new Error(`the API closed ${JSON.stringify(closed)}`);
    const states = (name) => tool.evaluate((name) => window.unitStates[name], name);
    await waitFor("the 4002 close", async () => (await states("banned")).some((e) => e.final));
    await waitFor("the 4001 close", async () => (await states("expiring")).some((e) => e.final), 15000);
    // Ten times the largest backoff: a client that meant to come back would have tried by now.
    await new Promise((r) => setTimeout(r, 1000));
    const banned = await states("banned"), expiring = await states("expiring"), refreshed = await states("refreshed");
    const end = (list, code) => { const e = list.at(-1); return e.state === "closed" && e.final && e.code === code; };
    if (!end(banned, 4002) || banned.filter((e) => e.state === "connecting").length !== 1) throw new Error(`after 4002: ${JSON.stringify(banned)}`);
    if (!end(expiring, 4001) || expiring.filter((e) => e.state === "connecting").length !== 1) throw new Error(`after 4001: ${JSON.stringify(expiring)}`);
    const r = await tool.evaluate(() => ({ token: window.unitClients.refreshed.token, state: window.unitClients.refreshed.state }));
    if (refreshed.length !== 2 || r.state !== "open") throw new Error(`the client with getToken: ${JSON.stringify(refreshed)}`);
    if (r.token === tokens.short) throw new Error("the refresh did not replace the token (a reconnect would present the expired one)");
    await tool.evaluate(() => Object.values(window.unitClients).forEach((c) => c.close()));
  });

  await check("a message typed in A (node 1) appears in B (node 2) with author and time", async () => {
    await say(a, "hello from ana");
    const got = await waitFor("the message in B", findMessage(b, "hello from ana"));
    if (got.author !== "ana" || got.mine || got.kind !== "chat") throw new Error(`B shows ${JSON.stringify(got)}`);
    const own = await waitFor("the echo in A", findMessage(a, "hello from ana"));
    if (!own.mine) throw new Error("A's own message is not marked as its own");
    const time = await b.$eval("[data-testid=message] time", (t) => t.textContent);
    if (!/\d{1,2}:\d{2}/.test(time)) throw new Error(`no time shown, got ${JSON.stringify(time)}`);
    const sent = bFrames.received.map((f) => JSON.parse(f)).find((m) => m.op === "message" && m.data?.text === "hello from ana");
    if (!sent || sent.data.user !== "ana" || typeof sent.data.ts !== "number") throw new Error(`the page must publish {user,text,ts}; B received ${JSON.stringify(sent)}`);
  });

  await check("Chromium and fanout agree on permessage-deflate (the page's messages travel compressed)", async () => {
    const ext = await a.evaluate((url) => new Promise((resolve, reject) => {
      const s = new WebSocket(url);
      s.onopen = () => { resolve(s.extensions); s.close(); };
      s.onerror = () => reject(new Error("WebSocket error"));
    }), `ws://${n1.addr}/ws?channel=deflate-check`);
    if (!ext.startsWith("permessage-deflate") || !ext.includes("server_no_context_takeover")) {
      throw new Error(`negotiated extensions ${JSON.stringify(ext)}`);
    }
  });

  await check("a message typed in B appears in A, and only B marks it as its own", async () => {
    await say(b, "hi ana, bob here");
    const got = await waitFor("the message in A", findMessage(a, "hi ana, bob here"));
    if (got.author !== "bob" || got.mine) throw new Error(`A shows ${JSON.stringify(got)}`);
    const own = await waitFor("the echo in B", findMessage(b, "hi ana, bob here"));
    if (!own.mine) throw new Error("B's own message is not marked as its own");
  });

  await check("a <script> message from another user is shown as text and never runs", async () => {
    const evil = `<script>alert("xss")</script><img src=x onerror="window.__pwned=1;alert('xss2')"><b>bold</b>`;
    await say(a, evil);
    // A later message, so that by its arrival an onerror handler on a broken image would have fired.
    await say(a, "after the script");
    await waitFrame(bFrames, (m) => m.data?.text === "after the script");
    const injected = await b.$$eval("[data-testid=log] script, [data-testid=log] img, [data-testid=log] b", (els) => els.length);
    if (injected) throw new Error(`${injected} elements from the message were injected into B's page`);
    const got = await waitFor("the message in B", findMessage(b, evil));
    if (got.author !== "ana") throw new Error(JSON.stringify(got));
    if (await b.evaluate(() => window.__pwned)) throw new Error("the onerror handler ran in B");
    if (dialogs.length) throw new Error(`script ran: ${dialogs.join("; ")}`);
  });

  await check("raw-mode and other clients' payloads are shown as plain text", async () => {
    // A real raw-mode client (no subprotocol) on node 1, and a publish straight into Redis.
    await a.evaluate((url) => new Promise((resolve, reject) => {
      const raw = new WebSocket(url);
      raw.onopen = () => { raw.send("plain <i>raw</i> text"); setTimeout(() => { raw.close(); resolve(); }, 300); };
      raw.onerror = () => reject(new Error("raw WebSocket failed"));
    }), `ws://${n1.addr}/ws?channel=room1`);
    await waitFrame(bFrames, (m) => m.data === "plain <i>raw</i> text");
    if (await b.$$eval("[data-testid=log] i", (els) => els.length)) throw new Error("raw text was rendered as HTML");
    const raw = await waitFor("the raw message in B", findMessage(b, "plain <i>raw</i> text"));
    if (raw.kind !== "raw" || raw.mine || raw.author !== "anonymous") throw new Error(`raw message shown as ${JSON.stringify(raw)}`);
    await redisCli("PUBLISH", "room1", '{"temperature":21.5}');
    const json = await waitFor("the JSON message in B", findMessage(b, '{"temperature":21.5}'));
    if (json.kind !== "json") throw new Error(`JSON payload shown as ${JSON.stringify(json)}`);
  });

  await check("a page opened with a token shows the server's name for its user, not the typed one", async () => {
    const token = mintToken({ sub: "u7", exp: Math.floor(Date.now() / 1000) + 600, info: { name: "Verified Vic" } });
    const v = await (await browser.newContext({ viewport: LAPTOP })).newPage();
    v.on("pageerror", (e) => pageErrors.push(`V: ${e.message}`));
    await v.goto(`http://${n1.addr}/?name=impostor&channel=room1&token=${token}`);
    await waitOpen(v);
    await say(v, "signed in as vic");
    const got = await waitFor("the message in B", findMessage(b, "signed in as vic"));
    if (got.author !== "Verified Vic") throw new Error(`B shows ${JSON.stringify(got)}`);
    const frame = bFrames.received.map((f) => JSON.parse(f)).find((m) => m.data?.text === "signed in as vic");
    if (frame?.user !== "u7" || frame?.data?.user !== "impostor") throw new Error(`B received ${JSON.stringify(frame)}`);
    await v.context().close();
  });

  await check("a channel opens with its last 50 messages from history, in order, then the live ones", async () => {
    const list = Array.from({ length: 60 }, (_, i) => `hist ${String(i + 1).padStart(3, "0")}`);
    await publishAll(tool, "hist", list);
    const h = await (await browser.newContext({ viewport: LAPTOP })).newPage();
    h.on("pageerror", (e) => pageErrors.push(`H: ${e.message}`));
    await h.goto(`http://${n2.addr}/?name=hana&channel=hist`);
    await waitOpen(h);
    await waitFor("the history in H", async () => (await messages(h)).length >= 50);
    const shown = await texts(h);
    if (shown.join("|") !== list.slice(-50).join("|")) throw new Error(`H shows ${shown.length}: ${shown[0]} .. ${shown.at(-1)}`);
    const flags = await h.$$eval("[data-testid=message]", (els) => els.map((e) => "history" in e.dataset));
    if (flags.some((f) => !f)) throw new Error("a message from history is not marked as such");
    if ((await messages(h)).some((m) => m.author !== "tina" || m.mine)) throw new Error("history messages lost their author");
    await publishAll(tool, "hist", ["hist live"]);
    await waitFor("a live message after the history", findMessage(h, "hist live"));
    const after = await texts(h);
    if (after.join("|") !== [...list.slice(-50), "hist live"].join("|")) throw new Error(`after a live one H shows ..${after.slice(-3)}`);
    if ((await unread(h, "lobby")) !== 0) throw new Error("history counted as unread");
    await h.context().close();
  });

  await check("a channel opened while messages keep coming shows a gapless run without duplicates", async () => {
    // The page reads history after its subscribe is answered, so what history returns overlaps
    // what already came live: it must merge the two by offset. Messages are published back to
    // back from before the page subscribes until its history answer is in, and a round counts
    // only if a message did fall into that window (the history answer holds an offset above
    // the subscribe's); a few rounds make sure the race really happened.
    for (let round = 1; ; round++) {
      const ch = `race${round}`;
      const h = await (await browser.newContext({ viewport: LAPTOP })).newPage();
      const hFrames = recordFrames(h);
      h.on("pageerror", (e) => pageErrors.push(`H${round}: ${e.message}`));
      await tool.evaluate((ch) => {
        window.racing = { stop: false, sent: [] };
        window.racePublisher = (async () => {
          const c = window.fanout.connect({});
          await c.whenOpen();
          for (let i = 1; !window.racing.stop && i <= 2000; i++) {
            const text = `${ch} ${i}`;
            await c.publish(ch, { user: "tina", text, ts: Date.now() });
            window.racing.sent.push(text);
          }
          c.close();
        })();
      }, ch);
      await waitFor("the first publishes", () => tool.evaluate(() => window.racing.sent.length >= 5));
      await h.goto(`http://${n2.addr}/?name=hana&channel=${ch}`);
      const historyReply = await waitFor("H's history answer", () => parsed(hFrames.received).find((m) => m.op === "history" && m.channel === ch));
      const sent = await tool.evaluate(async () => { window.racing.stop = true; await window.racePublisher; return window.racing.sent; });
      await waitFor("the last message in H", findMessage(h, sent.at(-1)));
      const shown = await texts(h);
      if (shown.length < Math.min(50, sent.length) || shown.join("|") !== sent.slice(-shown.length).join("|")) {
        throw new Error(`round ${round}: H shows ${shown.length} of ${sent.length}: ${JSON.stringify(shown.slice(0, 3))} .. ${JSON.stringify(shown.slice(-3))}`);
      }
      const ok = lastSubscribe(hFrames, ch).reply;
      const overlap = historyReply.messages.filter((m) => m.offset > ok.offset).length;
      await h.context().close();
      if (overlap > 0) break;
      if (round === 5) throw new Error("in 5 rounds no message fell between the subscribe and the history read: the merge was never tested");
    }
  });

  await check("a message on another channel raises B's unread count; opening it clears the count", async () => {
    await joinChannel(b, "side");
    await openChannel(b, "room1");
    await joinChannel(a, "side");
    await waitSubscribers("side", (n) => n >= 2, "to reach 2 (one per node)");
    await say(a, "over here");
    await waitFor("unread count 1 on #side in B", async () => (await unread(b, "side")) === 1);
    await say(a, "and here");
    await waitFor("unread count 2 on #side in B", async () => (await unread(b, "side")) === 2);
    if ((await unread(b, "room1")) !== 0) throw new Error("the active channel shows an unread count");
    if (!(await b.title()).startsWith("(2)")) throw new Error(`B's title does not show the unread total: ${await b.title()}`);
    await openChannel(b, "side");
    await waitFor("the messages after switching", findMessage(b, "and here"));
    if ((await unread(b, "side")) !== 0) throw new Error("the unread count stays on the opened channel");
    await openChannel(b, "room1");
    await openChannel(a, "room1");
  });

  // W, signed in, joins #room1 on node 2: the online list spans both nodes. W stays for the
  // screenshots and leaves after them.
  const w = await (await browser.newContext({ viewport: LAPTOP })).newPage();
  w.on("pageerror", (e) => pageErrors.push(`W: ${e.message}`));

  await check("the online list shows who is in the channel on every node, and follows joins", async () => {
    // Before W: A (node 1) and B (node 2) are anonymous.
    await waitFor("A's list of 2 anonymous", async () => JSON.stringify(await online(a)) === JSON.stringify({ users: [], guests: 2 }));
    const token = mintToken({ sub: "u8", exp: Math.floor(Date.now() / 1000) + 600, info: { name: "Wendy" } });
    await w.goto(`http://${n2.addr}/?name=w&channel=room1&token=${token}`);
    await waitOpen(w);
    for (const [label, p] of [["A", a], ["B", b], ["W", w]]) {
      await waitFor(`${label}'s list with Wendy`, async () => JSON.stringify(await online(p)) === JSON.stringify({ users: ["Wendy"], guests: 2 }));
      const count = await p.$eval("[data-testid=online-count]", (e) => (e.hidden ? null : e.dataset.count));
      if (count !== "3") throw new Error(`${label}'s header count is ${count}`);
    }
    // A second tab of the same user is one person, not two.
    const w2 = await (await browser.newContext({ viewport: LAPTOP })).newPage();
    await w2.goto(`http://${n1.addr}/?name=w&channel=room1&token=${token}`);
    await waitOpen(w2);
    await waitFor("A's list with Wendy's two tabs", () => a.$eval("[data-testid=online-user]", (e) => e.textContent.includes("×2")));
    if (JSON.stringify(await online(a)) !== JSON.stringify({ users: ["Wendy"], guests: 2 })) throw new Error(`A lists ${JSON.stringify(await online(a))}`);
    await w2.context().close();
    await waitFor("the second tab to leave", () => a.$eval("[data-testid=online-user]", (e) => !e.textContent.includes("×2")));
  });

  await check("laptop and phone layouts: no sideways scroll, state and unread visible on a phone", async () => {
    for (const [label, p] of [["a", a], ["b", b]]) {
      await shoot(p, `${label}-laptop.png`, label === "b" ? "chat.png" : null);
    }
    await b.setViewportSize(PHONE);
    await openChannel(a, "side");
    await say(a, "psst, bob");
    await waitFor("the phone menu badge in B", () => b.$eval("[data-testid=menu-unread]", (e) => !e.hidden && e.textContent === "1"));
    await openChannel(a, "room1");
    await a.setViewportSize(PHONE);
    for (const [label, p] of [["a", a], ["b", b]]) {
      if (await p.evaluate(() => document.documentElement.scrollWidth > window.innerWidth)) throw new Error(`page ${label} scrolls sideways on a phone`);
      for (const what of ["conn-state", "message-input", "menu"]) {
        if (!(await p.isVisible(`[data-testid=${what}]`))) throw new Error(`page ${label} hides ${what} on a phone`);
      }
      // The sidebar slides away when the viewport shrinks: shoot once it is out of view.
      await waitFor(`page ${label}'s drawer to close`, () => p.$eval("aside", (e) => e.getBoundingClientRect().right <= 0));
      await shoot(p, `${label}-phone.png`, label === "a" ? "chat-phone.png" : null);
    }
    // On a phone the channel list is a drawer behind the menu button.
    await b.click("[data-testid=menu]");
    await waitFor("the channel drawer", () => b.$eval("aside", (e) => e.getBoundingClientRect().left >= 0));
    await new Promise((r) => setTimeout(r, 400)); // let the slide-in finish for the screenshot
    await shoot(b, "b-phone-channels.png", "chat-phone-channels.png");
    await b.click("[data-testid=channel][data-channel=side] button");
    await waitFor("#side active", async () => (await activeChannel(b)) === "side");
    await waitFor("the drawer to close", async () => !(await b.$eval("#app", (e) => e.classList.contains("nav-open"))));
    if (!(await b.$eval("[data-testid=menu-unread]", (e) => e.hidden))) throw new Error("the menu badge stays after reading #side");
    await a.setViewportSize(LAPTOP);
    await b.setViewportSize(LAPTOP);
    await openChannel(b, "room1");
  });

  await check("a client that leaves drops off the online list on the other node", async () => {
    await w.context().close();
    await waitFor("A's list without Wendy", async () => JSON.stringify(await online(a)) === JSON.stringify({ users: [], guests: 2 }));
  });

  await check("B shows the outage, reconnects when node 2 restarts on its port, recovers what it missed, in order, once", async () => {
    const addr = n2.addr;
    // What B knows of #room1: the epoch of its subscribe reply, the offset of its last delivery.
    const known = lastSubscribe(bFrames, "room1").reply;
    const lastOffset = parsed(bFrames.received).filter((m) => m.op === "message" && m.channel === "room1").at(-1)?.offset;
    if (typeof known?.epoch !== "string" || !Number.isFinite(lastOffset)) throw new Error(`#room1 has no history: ok ${JSON.stringify(known)}, last offset ${lastOffset}`);
    const sentMark = bFrames.sent.length, receivedMark = bFrames.received.length;
    const code = await stop(n2.child);
    if (code !== 0) throw new Error(`node 2 exited with ${code} on SIGTERM`);
    // State and text read together: with full jitter a wait may be short, and the next
    // attempt flips the state to "reconnecting" between two separate reads.
    const shown = await waitFor("B to show it is offline", () => b.$eval("[data-testid=conn-state]", (e) => (e.dataset.state === "closed" ? e.textContent : null)));
    if (!/offline · retry in \d+ s/.test(shown) || !(await b.isVisible("[data-testid=conn-state]"))) throw new Error(`state shows ${JSON.stringify(shown)}`);
    await shoot(b, "b-offline.png", null);
    await waitSubscribers("room1", (n) => n === 1, "to drop to 1 (node 2 gone)");
    await waitSubscribers("side", (n) => n === 1, "to drop to 1 (node 2 gone)");
    // Published on node 1 while B's node is down, each acknowledged (so stored) before the next.
    const missed = Array.from({ length: 20 }, (_, i) => `missed while away ${i + 1}`);
    const missedSide = ["side missed 1", "side missed 2", "side missed 3"];
    const unreadBefore = await unread(b, "side");
    await publishAll(tool, "room1", missed);
    await publishAll(tool, "side", missedSide);
    n2 = await startNode("node2-restarted", addr, { redisPort });
    await waitOpen(b, 30000);
    await waitSubscribers("room1", (n) => n === 2, "to return to 2");
    await waitSubscribers("side", (n) => n === 2, "to return to 2 (B re-subscribed every channel)");
    // The state turns "open" before the re-subscribe is answered: wait for the answer.
    const { req, reply } = await waitFor("B's re-subscribe answer", () => { const r = lastSubscribe(bFrames, "room1", sentMark); return r.reply && r; });
    if (req?.since?.offset !== lastOffset || req.since.epoch !== known.epoch) throw new Error(`B re-subscribed with ${JSON.stringify(req)}; it knew offset ${lastOffset} of epoch ${known.epoch}`);
    if (reply?.recovered !== true) throw new Error(`the re-subscribe was answered ${JSON.stringify(reply)}`);
    await say(a, "welcome back bob");
    await waitFor("a message after the reconnect", findMessage(b, "welcome back bob"));
    const log = await texts(b);
    const at = log.indexOf(missed[0]);
    if (at < 0 || log.slice(at, at + missed.length).join("|") !== missed.join("|")) throw new Error(`B shows ${JSON.stringify(log.slice(-25))}`);
    if (log.indexOf("welcome back bob") !== at + missed.length) throw new Error("the live message is not right after the recovered ones");
    for (const t of missed) if (log.filter((x) => x === t).length !== 1) throw new Error(`${t} shown ${log.filter((x) => x === t).length} times`);
    // And on the wire: every missed message came exactly once, as a delivery after the reconnect.
    const wire = deliveredTexts(bFrames, "room1", receivedMark);
    if (wire.slice(0, missed.length).join("|") !== missed.join("|") || wire.length !== missed.length + 1) throw new Error(`B received ${JSON.stringify(wire)}`);
    // The online list was asked again: B (back on node 2) and A, nobody left over from before.
    await waitFor("B's online list after the reconnect", async () => JSON.stringify(await online(b)) === JSON.stringify({ users: [], guests: 2 }));
    // The inactive channel recovered too: its unread count counts what was missed.
    await waitFor("#side unread to count the missed messages", async () => (await unread(b, "side")) === unreadBefore + missedSide.length);
    await openChannel(a, "side");
    await say(a, "side after restart");
    await waitFor("#side unread to rise in B", async () => (await unread(b, "side")) === unreadBefore + missedSide.length + 1);
    await openChannel(a, "room1");
  });

  await check("the display name persists across a reload, with channels and the own-message mark", async () => {
    await b.fill("[data-testid=name]", "bobby");
    await b.press("[data-testid=name]", "Enter");
    await b.goto(`http://${n2.addr}/`); // no ?name= this time
    await waitOpen(b);
    const name = await b.inputValue("[data-testid=name]");
    if (name !== "bobby") throw new Error(`after reload the name is ${JSON.stringify(name)}`);
    const list = await channelList(b);
    if (!list.includes("room1") || !list.includes("side")) throw new Error(`after reload the channels are ${list}`);
    await openChannel(b, "room1");
    // B publishes (A's subscription is steady), so no message can fall in B's re-subscribe gap.
    await say(b, "bobby after reload");
    const got = await waitFor("B's message in A", findMessage(a, "bobby after reload"));
    if (got.author !== "bobby") throw new Error(`A shows ${JSON.stringify(got)}`);
    const own = await waitFor("the echo in B", findMessage(b, "bobby after reload"));
    if (!own.mine) throw new Error("after reload B's own message is not marked as its own");
  });

  await check("leaving a channel stops its messages", async () => {
    await openChannel(b, "side");
    const before = bFrames.sent.length;
    await b.click("[data-testid=leave]");
    const unsub = await waitFor("the unsubscribe frame", () => bFrames.sent.slice(before).map((f) => JSON.parse(f)).find((m) => m.op === "unsubscribe" && m.channel === "side"));
    await waitFor("the unsubscribe to be acknowledged", () => bFrames.received.some((f) => { const m = JSON.parse(f); return m.op === "ok" && m.id === unsub.id; }));
    if ((await channelList(b)).includes("side")) throw new Error("#side is still listed in B");
    await openChannel(b, "room1");
    await openChannel(a, "side");
    await say(a, "ghost on side");
    await waitFor("A's own echo on #side", findMessage(a, "ghost on side"));
    await openChannel(a, "room1");
    await say(a, "marker on room1");
    await waitFor("the marker in B", findMessage(b, "marker on room1"));
    // The frame recorder does see #side traffic (B got "over here" before leaving) ...
    if (!bFrames.received.some((f) => f.includes("over here"))) throw new Error("the frame recorder saw nothing; the check below would be vacuous");
    // ... and A's #side message, published before the marker, never reached B.
    if (bFrames.received.some((f) => f.includes("ghost on side"))) throw new Error("B still received #side after leaving it");
    if ((await channelList(b)).includes("side")) throw new Error("#side came back in B's list");
  });

  // A standalone node keeps history in memory: restarting it loses the history and changes the
  // epoch, which is how a page meets `recovered: false` (with Redis the epoch survives a node).
  let n3 = await startNode("node3", "127.0.0.1:0");
  const c = await (await browser.newContext({ viewport: LAPTOP })).newPage();
  const cFrames = recordFrames(c);
  c.on("pageerror", (e) => pageErrors.push(`C: ${e.message}`));
  await c.goto(`http://${n3.addr}/?name=cleo&channel=gap1`);
  await waitOpen(c);

  await check("when recovery fails (the node restarted and lost the history) the page marks the gap and loads what there is", async () => {
    await publishAll(tool, "gap1", ["before 1", "before 2", "before 3"], { node: n3 });
    await waitFor("the messages in C", findMessage(c, "before 3"));
    const known = lastSubscribe(cFrames, "gap1").reply;
    const sentMark = cFrames.sent.length;
    const addr = n3.addr;
    await stop(n3.child);
    await waitFor("C to show it is offline", async () => (await connState(c)) === "closed");
    // Held offline while the new node takes messages, so these come from history, not live.
    await c.context().setOffline(true);
    n3 = await startNode("node3-restarted", addr);
    await publishAll(tool, "gap1", ["after 1", "after 2"], { node: n3 });
    await c.context().setOffline(false);
    await waitOpen(c, 30000);
    const { req, reply } = await waitFor("C's re-subscribe answer", () => { const r = lastSubscribe(cFrames, "gap1", sentMark); return r.reply && r; });
    if (req?.since?.epoch !== known.epoch || req.since.offset !== 3) throw new Error(`C re-subscribed with ${JSON.stringify(req)} (knew ${JSON.stringify(known)})`);
    if (reply?.recovered !== false || reply.epoch === known.epoch) throw new Error(`the re-subscribe was answered ${JSON.stringify(reply)}`);
    await waitFor("what the new node kept", findMessage(c, "after 2"));
    // They were published while C was held offline, so they came from the history the page
    // asked for after the gap, not as live deliveries.
    const live = deliveredTexts(cFrames, "gap1");
    if (live.includes("after 1") || live.includes("after 2")) throw new Error(`C got them live: ${JSON.stringify(live)}`);
    await publishAll(tool, "gap1", ["after 3"], { node: n3 });
    await waitFor("a live message", findMessage(c, "after 3"));
    const log = await c.$$eval("[data-testid=log] > *", (els) => els.map((e) => e.dataset.testid === "gap" ? "GAP" : e.querySelector("[data-testid=text]")?.textContent ?? e.dataset.testid));
    const want = ["before 1", "before 2", "before 3", "GAP", "after 1", "after 2", "after 3"];
    if (log.join("|") !== want.join("|")) throw new Error(`C's log is ${JSON.stringify(log)}`);
    if (!(await c.isVisible("[data-testid=gap]"))) throw new Error("the gap marker is not visible");
    await shoot(c, "c-gap.png", null);
  });

  await check("a node without history or presence (no configuration file): live messages only, no errors shown, no online list", async () => {
    const addr = n3.addr;
    await stop(n3.child);
    await waitFor("C to show it is offline", async () => (await connState(c)) === "closed");
    n3 = await startNode("node3-no-config", addr, { config: false });
    await waitOpen(c, 30000);
    // C asked to recover; a channel that keeps no history cannot: that too is a gap.
    await waitFor("a second gap marker in C", async () => (await c.$$("[data-testid=gap]")).length === 2);
    const d = await (await browser.newContext({ viewport: LAPTOP })).newPage();
    const dFrames = recordFrames(d);
    d.on("pageerror", (e) => pageErrors.push(`D: ${e.message}`));
    await d.goto(`http://${n3.addr}/?name=dora&channel=gap1`);
    await waitOpen(d);
    await say(d, "no history here");
    await waitFor("D's message in C", findMessage(c, "no history here"));
    await waitFor("D's own message", findMessage(d, "no history here"));
    // D did ask for history and presence, and was told no: the page just goes on.
    const replies = parsed(dFrames.received).filter((m) => m.op === "error").map((m) => m.error);
    if (!replies.some((e) => /history is off/.test(e)) || !replies.some((e) => /presence is off/.test(e))) throw new Error(`D got ${JSON.stringify(replies)}`);
    for (const [label, p] of [["C", c], ["D", d]]) {
      if (await online(p)) throw new Error(`${label} shows an online list on a channel without presence`);
      if (await p.isVisible("[data-testid=online-count]")) throw new Error(`${label} shows an online count`);
    }
    if ((await d.$$("[data-testid=notice], [data-testid=gap]")).length) throw new Error("D shows a notice");
    if ((await texts(d)).join("|") !== "no history here") throw new Error(`D shows ${await texts(d)}`);
    // Another restart: nothing can be recovered on a channel without history, and D says so
    // (once, in the channel) instead of pretending nothing was missed.
    const again = n3.addr;
    await stop(n3.child);
    await waitFor("D to show it is offline", async () => (await connState(d)) === "closed");
    n3 = await startNode("node3-no-config-again", again, { config: false });
    await waitOpen(d, 30000);
    const notes = await waitFor("D's notice", async () => { const n = await d.$$eval("[data-testid=notice]", (els) => els.map((e) => e.textContent)); return n.length ? n : null; });
    if (notes.length !== 1 || !/keeps no history/.test(notes[0])) throw new Error(`D shows notices ${JSON.stringify(notes)}`);
    const resub = parsed(dFrames.sent).filter((m) => m.op === "subscribe" && m.channel === "gap1");
    if (resub.length !== 2 || resub.some((m) => m.since)) throw new Error(`D subscribed with ${JSON.stringify(resub)}`);
    await d.context().close();
  });
  await c.context().close();
  await stop(n3.child);

  await check("no JavaScript errors or CSP violations in either page", async () => {
    const distinct = [...new Set(pageErrors)];
    if (distinct.length) throw new Error(`${distinct.length} distinct: ${distinct.slice(0, 3).join(" | ")}`);
  });

  await stop(n1.child);
  await stop(n2.child);
} catch (e) {
  failed++;
  console.log(`FAIL setup: ${e.stack || e}`);
} finally {
  await cleanup();
}
console.log(`browser: artifacts in ${artifacts}${updateScreenshots ? "; README screenshots updated" : ""}`);
console.log(`browser: ${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
