// End-to-end test of the chat page in headless Chromium: redis-server and two fanout nodes,
// page A on node 1 and page B on node 2. Every process started here is stopped by PID.
import { spawn } from "node:child_process";
import { mkdtempSync, mkdirSync, rmSync } from "node:fs";
import { createServer, createConnection } from "node:net";
import { tmpdir } from "node:os";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const here = dirname(fileURLToPath(import.meta.url));
const FANOUT = process.env.FANOUT_BIN || join(here, "../../target/release/fanout");
const artifacts = join(here, "artifacts");
mkdirSync(artifacts, { recursive: true });
mkdirSync(join(here, "screenshots"), { recursive: true });
const children = new Set();
let passed = 0, failed = 0;

function freePort() {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.listen(0, "127.0.0.1", () => { const p = s.address().port; s.close(() => resolve(p)); });
    s.on("error", reject);
  });
}

function waitPort(port, ms = 5000) {
  const until = Date.now() + ms;
  return new Promise((resolve, reject) => {
    const tryOnce = () => {
      const c = createConnection(port, "127.0.0.1");
      c.on("connect", () => { c.destroy(); resolve(); });
      c.on("error", () => Date.now() > until ? reject(new Error(`port ${port} never opened`)) : setTimeout(tryOnce, 50));
    };
    tryOnce();
  });
}

function start(cmd, args) {
  const child = spawn(cmd, args, { stdio: ["ignore", "pipe", "inherit"] });
  children.add(child);
  child.on("exit", () => children.delete(child));
  return child;
}

function startNode(listen, redisPort) {
  const child = start(FANOUT, ["--listen", listen, "--threads", "2", "--redis", `redis://127.0.0.1:${redisPort}`,
    "--drain-delay", "0", "--drain-time", "0.5", "--log-level", "warn"]);
  return new Promise((resolve, reject) => {
    let buf = "";
    const timer = setTimeout(() => reject(new Error("fanout did not print its address")), 10000);
    child.stdout.on("data", (d) => {
      buf += d;
      const m = buf.match(/listening on (\S+)/);
      if (m) { clearTimeout(timer); resolve({ child, addr: m[1] }); }
    });
    child.on("exit", (code) => reject(new Error(`fanout exited early (${code})`)));
  });
}

function stop(child, signal = "SIGTERM", ms = 5000) {
  return new Promise((resolve) => {
    if (child.exitCode !== null || child.signalCode !== null) return resolve(child.exitCode);
    const t = setTimeout(() => child.kill("SIGKILL"), ms);
    child.once("exit", (code) => { clearTimeout(t); resolve(code); });
    child.kill(signal);
  });
}

async function check(name, fn) {
  try { await fn(); passed++; console.log(`ok   ${name}`); }
  catch (e) { failed++; console.log(`FAIL ${name}: ${e.message}`); }
}

async function messages(page) {
  return page.$$eval("[data-testid=message]", (els) => els.map((e) => ({
    author: e.querySelector("[data-testid=author]").textContent,
    text: e.querySelector("[data-testid=text]").textContent,
    mine: e.classList.contains("mine"),
  })));
}

async function waitFor(what, fn, ms = 8000) {
  const until = Date.now() + ms;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > until) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

async function say(page, text) {
  await page.fill("[data-testid=message-input]", text);
  await page.press("[data-testid=message-input]", "Enter");
}

const redisPort = await freePort();
const redis = start("redis-server", ["--port", String(redisPort), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]);
const profile = mkdtempSync(join(tmpdir(), "fanout-chromium-"));
let browser;
try {
  await waitPort(redisPort);
  const n1 = await startNode("127.0.0.1:0", redisPort);
  let n2 = await startNode("127.0.0.1:0", redisPort);
  browser = await chromium.launchPersistentContext(profile, {
    executablePath: "/usr/bin/chromium",
    headless: true,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
    viewport: { width: 1280, height: 800 },
  });
  const a = await browser.newPage();
  const b = await browser.newPage();
  const alerts = [];
  for (const p of [a, b]) p.on("dialog", (d) => { alerts.push(d.message()); d.dismiss(); });
  await a.goto(`http://${n1.addr}/?name=ana&channel=room1`);
  await b.goto(`http://${n2.addr}/?name=bob&channel=room1`);
  for (const p of [a, b]) await waitFor("connected", () => p.$eval("[data-testid=conn-state]", (e) => e.dataset.state === "open"));
  // Subscriptions travel to Redis asynchronously; give both nodes' SUBSCRIBE a moment to land.
  await new Promise((r) => setTimeout(r, 300));

  await check("a message typed in A (node 1) appears in B (node 2) with its author", async () => {
    await say(a, "hello from ana");
    const got = await waitFor("message in B", async () => (await messages(b)).find((m) => m.text === "hello from ana"));
    if (got.author !== "ana" || got.mine) throw new Error(JSON.stringify(got));
    const own = await waitFor("own message in A", async () => (await messages(a)).find((m) => m.text === "hello from ana"));
    if (!own.mine) throw new Error("A's own message is not marked as its own");
  });

  await check("a message typed in B appears in A", async () => {
    await say(b, "hi ana, bob here");
    const got = await waitFor("message in A", async () => (await messages(a)).find((m) => m.text === "hi ana, bob here"));
    if (got.author !== "bob") throw new Error(JSON.stringify(got));
  });

  await check("HTML from another user is shown as text and never runs", async () => {
    const evil = `<img src=x onerror="alert('xss')"><script>alert('xss2')</script><b>bold</b>`;
    await say(a, evil);
    await waitFor("evil message in B", async () => (await messages(b)).find((m) => m.text === evil));
    const injected = await b.$$eval("[data-testid=log] img, [data-testid=log] script, [data-testid=log] b", (els) => els.length);
    if (injected !== 0) throw new Error(`${injected} elements were injected into the page`);
    await new Promise((r) => setTimeout(r, 300));
    if (alerts.length) throw new Error(`script ran: ${alerts}`);
  });

  await check("a message on another channel raises B's unread count", async () => {
    await b.fill("[data-testid=join-input]", "side");
    await b.press("[data-testid=join-input]", "Enter");
    await b.click("[data-testid=channel][data-channel=room1]");
    await a.fill("[data-testid=join-input]", "side");
    await a.press("[data-testid=join-input]", "Enter");
    await new Promise((r) => setTimeout(r, 300));
    await say(a, "over here");
    await waitFor("unread badge 1", () => b.$eval("[data-testid=channel][data-channel=side] [data-testid=unread]",
      (e) => !e.hidden && e.textContent === "1"));
    await b.click("[data-testid=channel][data-channel=side]");
    await waitFor("message after switching", async () => (await messages(b)).find((m) => m.text === "over here"));
    const hidden = await b.$eval("[data-testid=channel][data-channel=side] [data-testid=unread]", (e) => e.hidden);
    if (!hidden) throw new Error("unread badge still shown on the active channel");
    await b.click("[data-testid=channel][data-channel=room1]");
    await a.click("[data-testid=channel][data-channel=room1]");
  });

  await b.screenshot({ path: join(artifacts, "b-laptop.png") });
  await a.screenshot({ path: join(artifacts, "a-laptop.png") });
  await a.screenshot({ path: join(here, "screenshots", "chat.png") });

  await check("B reconnects after node 2 restarts on the same port and receives again", async () => {
    const addr = n2.addr;
    const code = await stop(n2.child);
    if (code !== 0) throw new Error(`node 2 exited with ${code} on SIGTERM`);
    await waitFor("B shows disconnected", () => b.$eval("[data-testid=conn-state]", (e) => e.dataset.state !== "open"));
    n2 = await startNode(addr, redisPort);
    await waitFor("B reconnected", () => b.$eval("[data-testid=conn-state]", (e) => e.dataset.state === "open"), 20000);
    await new Promise((r) => setTimeout(r, 300));
    await say(a, "welcome back bob");
    await waitFor("message after reconnect", async () => (await messages(b)).find((m) => m.text === "welcome back bob"));
  });

  await check("the page fits a phone-sized screen", async () => {
    const phone = await browser.newPage();
    await phone.setViewportSize({ width: 390, height: 780 });
    await phone.goto(`http://${n1.addr}/?name=cy&channel=room1`);
    await waitFor("phone connected", () => phone.$eval("[data-testid=conn-state]", (e) => e.dataset.state === "open"));
    await say(a, "hello phone");
    await waitFor("message on phone", async () => (await messages(phone)).find((m) => m.text === "hello phone"));
    const overflow = await phone.evaluate(() => document.documentElement.scrollWidth > window.innerWidth);
    if (overflow) throw new Error("the page scrolls sideways on a phone");
    await phone.screenshot({ path: join(artifacts, "phone.png") });
    await phone.screenshot({ path: join(here, "screenshots", "chat-phone.png") });
  });
  await stop(n1.child);
  await stop(n2.child);
} catch (e) {
  failed++;
  console.log(`FAIL setup: ${e.stack || e}`);
} finally {
  if (browser) await browser.close().catch(() => {});
  for (const c of [...children]) await stop(c, "SIGKILL");
  await stop(redis, "SIGKILL");
  rmSync(profile, { recursive: true, force: true });
}
console.log(`browser: ${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
