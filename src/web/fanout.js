/**
 * fanout.js: the browser client for fanout's JSON WebSocket protocol, served by every node at
 * /fanout.js (embedded in the binary like the chat page, src/reactor/routes.rs). An ES module with
 * no build step and no dependencies:
 *
 *   import { connect } from "/fanout.js";
 *   const client = connect({ token, onState(state, info) {} });
 *   const sub = client.subscribe("chat:lobby", { onMessage(msg) {}, onGap(info) {} });
 *   await client.publish("chat:lobby", { text: "hi" });
 *
 * What it adds over a bare WebSocket, and why:
 * - Every request carries an id and returns a Promise settled by the reply with that id, so a
 *   publish resolves only once the server acknowledged it (with Redis: once Redis did) and an
 *   error reply rejects with the server's words.
 * - Reconnection with exponential backoff and full jitter, so a restarted node is not hit by all
 *   of its clients at the same instant, and re-subscription of every channel.
 * - Recovery: per channel it remembers the epoch (from the subscribe reply) and the offset of
 *   the last delivery, and re-subscribes with `since`, so the server replays what was missed.
 *   When the server cannot (`recovered: false`), `onGap` tells the application to reload.
 *
 * The README's "Browser client" section documents the API; tests/browser/chat.test.mjs tests it
 * in Chromium against real nodes.
 */

/** Backoff and timing defaults (milliseconds); every one can be given to `connect`. */
export const DEFAULTS = Object.freeze({
  // First retry waits up to baseDelay, doubling per failed attempt up to maxDelay.
  baseDelay: 500,
  maxDelay: 10_000,
  // A connection that stayed open this long resets the backoff. One that the node accepts and
  // drops at once (overloaded, draining) must not reset it, or its clients would hammer it.
  stableAfter: 5_000,
  // A request with no reply after this long is rejected (code "timeout"); the connection stays.
  requestTimeout: 15_000,
  // With getToken and a token that has `exp`, a fresh token is fetched and sent with the
  // refresh op this long before the token expires, so the server never closes with 4001.
  refreshLead: 30_000,
});

/**
 * The wait before reconnect attempt number `attempt` (0 for the first retry): "full jitter",
 * uniform in [0, min(maxDelay, baseDelay * 2^attempt)). Full rather than partial jitter because
 * it spreads a crowd of clients that lost the same node over the whole window.
 */
export function backoffDelay(attempt, { baseDelay = DEFAULTS.baseDelay, maxDelay = DEFAULTS.maxDelay } = {}, random = Math.random) {
  const ceiling = Math.min(maxDelay, baseDelay * 2 ** Math.min(attempt, 30));
  return Math.floor(random() * ceiling);
}

/** Close codes fanout uses (README, "Close codes"). */
export const CLOSE = Object.freeze({ TOKEN_EXPIRED: 4001, DISCONNECTED: 4002, FORBIDDEN: 4003 });

// Subscribe errors that asking again cannot fix: a namespace rule, a bad name, the limit of
// channels per connection. Any other error reply to a subscribe (history unavailable while the
// node's Redis link comes up, server busy) is retried with backoff, because dropping the
// subscription would silently lose the channel for good.
const REFUSAL = /^(forbidden|channel name|subscription limit|subscription refused|invalid|unknown|expected|missing)/i;

/** Why a request failed: `code` is "server" (an error reply), "disconnected" or "timeout". */
export class FanoutError extends Error {
  constructor(message, code, reply) {
    super(message);
    this.name = "FanoutError";
    this.code = code;
    this.reply = reply;
  }
}

/** Opens a client and starts connecting at once. See the README for the options. */
export function connect(options = {}) {
  return new Client(options);
}

function defaultUrl() {
  return (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws";
}

// The `exp` claim of a JWT in milliseconds, or null. Only read to schedule a refresh: the
// server is what checks the token.
function tokenExpiry(token) {
  try {
    const b64 = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const exp = JSON.parse(atob(b64 + "=".repeat((4 - (b64.length % 4)) % 4))).exp;
    return Number.isFinite(exp) ? exp * 1000 : null;
  } catch {
    return null;
  }
}

class Client {
  #opts;
  #token;
  #ws = null;
  #state = "closed";
  #subs = new Map();     // channel -> Subscription
  #pending = new Map();  // request id -> { resolve, reject, timer, op }
  #nextId = 1;
  #attempt = 0;          // failed attempts since the last stable connection
  #openedAt = 0;
  #retryTimer = null;
  #refreshTimer = null;
  #stopped = false;      // close() was called, or the server said not to come back
  #closedByUser = false; // close() was called: nothing brings this client back
  #tried = false;        // a connection was attempted before (so getToken is due)
  #waiters = [];         // whenOpen() promises

  constructor(options) {
    this.#opts = { ...DEFAULTS, url: null, token: null, getToken: null, onState: null, onError: null, ...options };
    this.#token = this.#opts.token;
    this.#open();
  }

  /** "connecting", "open" or "closed". */
  get state() { return this.#state; }

  /** The token the next connection will present (the newest one given or fetched). */
  get token() { return this.#token; }

  /**
   * Resolves once the connection is open (at once if it is), so a script can wait before its
   * first request; rejects if the client is closed for good first.
   */
  whenOpen() {
    if (this.#state === "open") return Promise.resolve();
    if (this.#stopped) return Promise.reject(new FanoutError("client is closed", "closed"));
    return new Promise((resolve, reject) => this.#waiters.push({ resolve, reject }));
  }

  /** The subscription of `channel`, or undefined. */
  subscription(channel) { return this.#subs.get(channel); }

  /**
   * Subscribes to `channel` (one subscription per channel per client) and keeps it across
   * reconnects. Handlers: onMessage(msg), onSubscribed(info), onGap(info), onJoin(p), onLeave(p),
   * onError(err) (err.retrying: false when refused for good, true when it will ask again).
   * Options: presenceEvents (join/leave events), since ({offset, epoch} saved by the
   * application, to recover from there on the first subscribe too).
   */
  subscribe(channel, handlers = {}) {
    if (this.#stopped) throw new FanoutError("client is closed", "closed");
    if (this.#subs.has(channel)) throw new FanoutError(`already subscribed to ${JSON.stringify(channel)}`, "duplicate");
    const sub = new Subscription(this, channel, handlers);
    this.#subs.set(channel, sub);
    if (this.#state === "open") this.#sendSubscribe(sub);
    return sub;
  }

  /** Publishes `data` (any JSON value; a string is sent as its bytes). Resolves on the ok. */
  publish(channel, data) { return this.#request({ op: "publish", channel, data }); }

  /** The newest `limit` messages of a channel with history: {channel, epoch, offset, messages}. */
  history(channel, { limit } = {}) {
    const req = { op: "history", channel };
    if (limit !== undefined) req.limit = limit;
    return this.#request(req);
  }

  /** Who is in a channel with presence, on every node: {channel, clients: [{client, user, info}]}. */
  presence(channel) { return this.#request({ op: "presence", channel }); }

  /** Counts only: {channel, clients, users}. */
  presenceStats(channel) { return this.#request({ op: "presence_stats", channel }); }

  /**
   * Sends a newer token for the same user (the refresh op); without one, asks getToken. On the
   * ok the new token is also the one the next reconnect presents.
   */
  async refresh(token) {
    const next = token ?? (this.#opts.getToken ? await this.#opts.getToken() : null);
    if (!next) throw new FanoutError("no token to refresh with", "no-token");
    const reply = await this.#request({ op: "refresh", token: next });
    const before = this.#token ? tokenExpiry(this.#token) : null;
    this.#token = next;
    // Only a token that lives longer is worth scheduling again: getToken handing back the same
    // one must not turn into a refresh every second.
    if (before === null || (tokenExpiry(next) ?? 0) > before) this.#scheduleRefresh();
    return reply;
  }

  /**
   * Connects now if waiting to retry, or again after the server said not to come back (4001,
   * 4002, 4003), with `token` when given (say, after the user signed in again).
   */
  reconnect(token) {
    if (this.#state !== "closed" || this.#closedByUser) return;
    if (token !== undefined) this.#token = token;
    this.#stopped = false;
    clearTimeout(this.#retryTimer);
    this.#open();
  }

  /** Closes the connection for good; pending requests are rejected. */
  close() {
    this.#closedByUser = true;
    this.#stopped = true;
    clearTimeout(this.#retryTimer);
    clearTimeout(this.#refreshTimer);
    const ws = this.#ws;
    this.#ws = null;
    if (ws) ws.close(1000, "client closed");
    this.#failPending("client closed");
    for (const sub of this.#subs.values()) sub._state = "unsubscribed";
    this.#subs.clear();
    this.#setState("closed", { final: true, code: 1000, reason: "client closed" });
  }

  // ---------- internals (also used by Subscription) ----------

  _forget(sub) {
    if (this.#subs.get(sub.channel) !== sub) return Promise.resolve();
    this.#subs.delete(sub.channel);
    // Not connected: the next connection simply does not subscribe it again.
    if (this.#state !== "open") return Promise.resolve();
    return this.#request({ op: "unsubscribe", channel: sub.channel });
  }

  #setState(state, info = {}) {
    this.#state = state;
    if (state === "open" || info.final) {
      const waiters = this.#waiters;
      this.#waiters = [];
      for (const w of waiters) {
        if (state === "open") w.resolve();
        else w.reject(new FanoutError(`connection closed for good${info.code ? ` (${info.code})` : ""}`, "closed"));
      }
    }
    try { this.#opts.onState?.(state, { attempt: this.#attempt, ...info }); } catch (e) { reportLater(e); }
  }

  async #open() {
    if (this.#stopped) return;
    this.#setState("connecting");
    let token = this.#token;
    const first = !this.#tried;
    this.#tried = true;
    if (this.#opts.getToken && (!first || !token)) {
      // A reconnect asks for a fresh token: the old one may have expired while we were away
      // (the server answers an expired token with HTTP 401, which a browser only reports as
      // a failed connection, so there is no telling it apart from a network error).
      try {
        token = (await this.#opts.getToken()) ?? null;
        this.#token = token;
      } catch (e) {
        return this.#retry({ reason: `getToken failed: ${e?.message ?? e}` });
      }
      if (this.#stopped) return;
    }
    const url = new URL(this.#opts.url ?? defaultUrl(), location.href);
    if (token) url.searchParams.set("token", token);
    let ws;
    try {
      ws = new WebSocket(url.href, "fanout.json");
    } catch (e) {
      return this.#retry({ reason: String(e?.message ?? e) });
    }
    this.#ws = ws;
    ws.onopen = () => {
      if (this.#ws !== ws) return;
      this.#openedAt = Date.now();
      this.#setState("open");
      this.#scheduleRefresh();
      for (const sub of this.#subs.values()) this.#sendSubscribe(sub);
    };
    ws.onmessage = (ev) => { if (this.#ws === ws) this.#onFrame(ev.data); };
    ws.onclose = (ev) => { if (this.#ws === ws) this.#onClose(ev); };
  }

  #onClose(ev) {
    this.#ws = null;
    clearTimeout(this.#refreshTimer);
    this.#failPending("disconnected");
    for (const sub of this.#subs.values()) if (sub._state === "subscribed") sub._state = "subscribing";
    if (this.#openedAt && Date.now() - this.#openedAt >= this.#opts.stableAfter) this.#attempt = 0;
    this.#openedAt = 0;
    const info = { code: ev.code, reason: ev.reason };
    // 4002: the application's backend disconnected this user (logout, ban); 4003: the token
    // forbids what was asked. Reconnecting would only be refused again or undo a logout.
    // 4001 without getToken: the only token we have has expired, so every retry would fail.
    if (ev.code === CLOSE.DISCONNECTED || ev.code === CLOSE.FORBIDDEN ||
        (ev.code === CLOSE.TOKEN_EXPIRED && !this.#opts.getToken)) {
      this.#stopped = true;
      return this.#setState("closed", { ...info, final: true });
    }
    this.#retry(info);
  }

  #retry(info) {
    const delay = backoffDelay(this.#attempt, this.#opts);
    this.#attempt++;
    clearTimeout(this.#retryTimer);
    this.#retryTimer = setTimeout(() => this.#open(), delay);
    this.#setState("closed", { ...info, final: false, retryIn: delay, retryAt: Date.now() + delay });
  }

  #scheduleRefresh() {
    clearTimeout(this.#refreshTimer);
    const exp = this.#opts.getToken && this.#token ? tokenExpiry(this.#token) : null;
    if (exp === null) return;
    // setTimeout takes at most 2^31-1 ms (24.8 days) and fires at once beyond that.
    const wait = Math.min(2 ** 31 - 1, Math.max(1000, exp - Date.now() - this.#opts.refreshLead));
    this.#refreshTimer = setTimeout(() => {
      // A failed refresh is not fatal: at worst the server closes with 4001 and the reconnect
      // fetches a new token anyway.
      this.refresh().catch((e) => this.#opts.onError?.(e));
    }, wait);
  }

  #sendSubscribe(sub) {
    const req = { op: "subscribe", channel: sub.channel };
    if (sub._handlers.presenceEvents) req.presence_events = true;
    const since = sub._since();
    if (since) req.since = since;
    sub._state = "subscribing";
    const ws = this.#ws;
    this.#request(req).then(
      (reply) => { sub._failures = 0; sub._subscribed(reply, since); },
      (err) => {
        // Lost with the connection: the next connection subscribes again anyway.
        if (err.code !== "server" || this.#subs.get(sub.channel) !== sub) return;
        err.retrying = !REFUSAL.test(err.message);
        if (!err.retrying) {
          this.#subs.delete(sub.channel);
          return sub._refused(err);
        }
        const delay = backoffDelay(sub._failures++, this.#opts);
        clearTimeout(sub._retryTimer);
        sub._retryTimer = setTimeout(() => {
          if (this.#subs.get(sub.channel) === sub && this.#ws === ws && this.#state === "open") this.#sendSubscribe(sub);
        }, delay);
        sub._call("onError", err);
      },
    );
  }

  #request(req) {
    return new Promise((resolve, reject) => {
      if (this.#state !== "open" || !this.#ws) {
        reject(new FanoutError("not connected", "disconnected"));
        return;
      }
      const id = this.#nextId++;
      const timer = this.#opts.requestTimeout > 0
        ? setTimeout(() => {
          this.#pending.delete(id);
          reject(new FanoutError(`no reply to ${req.op} within ${this.#opts.requestTimeout} ms`, "timeout"));
        }, this.#opts.requestTimeout)
        : null;
      this.#pending.set(id, { resolve, reject, timer, op: req.op });
      this.#ws.send(JSON.stringify({ ...req, id }));
    });
  }

  #failPending(why) {
    const pending = [...this.#pending.values()];
    this.#pending.clear();
    // A publish that was in flight may or may not have been delivered: it is rejected, never
    // sent again, so a lost acknowledgement cannot turn into a duplicate message.
    for (const p of pending) { clearTimeout(p.timer); p.reject(new FanoutError(why, "disconnected")); }
  }

  #onFrame(text) {
    let m;
    try { m = JSON.parse(text); } catch { return; }
    if (!m || typeof m !== "object") return;
    switch (m.op) {
      case "message": return this.#subs.get(m.channel)?._deliver(m);
      case "join": return this.#subs.get(m.channel)?._presence("onJoin", m);
      case "leave": return this.#subs.get(m.channel)?._presence("onLeave", m);
      default: {
        const p = this.#pending.get(m.id);
        if (!p) {
          if (m.op === "error") this.#opts.onError?.(new FanoutError(String(m.error), "server", m));
          return;
        }
        this.#pending.delete(m.id);
        clearTimeout(p.timer);
        if (m.op === "error") p.reject(new FanoutError(String(m.error), "server", m));
        else p.resolve(m);
      }
    }
  }
}

class Subscription {
  constructor(client, channel, handlers) {
    this.channel = channel;
    /** Offset of the last message received (or the channel's top when subscribed); null without history. */
    this.offset = handlers.since?.offset ?? null;
    /** The channel's history epoch from the last subscribe reply; null without history. */
    this.epoch = handlers.since?.epoch ?? null;
    this._client = client;
    this._handlers = handlers;
    this._state = "subscribing";
    this._subscribedOnce = false;
    this._failures = 0;      // error replies to subscribe in a row, for the retry's backoff
    this._retryTimer = null;
    this.ready = new Promise((resolve, reject) => { this._resolve = resolve; this._reject = reject; });
    // A caller that only uses the handlers must not see an unhandled rejection.
    this.ready.catch(() => {});
  }

  /** "subscribing", "subscribed", "unsubscribed" or "failed". */
  get state() { return this._state; }

  /** Leaves the channel; resolves on the server's ok (at once when not connected). */
  unsubscribe() {
    this._state = "unsubscribed";
    clearTimeout(this._retryTimer);
    return this._client._forget(this);
  }

  _since() {
    return this.epoch !== null && Number.isFinite(this.offset) ? { offset: this.offset, epoch: this.epoch } : null;
  }

  _subscribed(reply, since) {
    if (this._state === "unsubscribed") return;
    this._state = "subscribed";
    const resubscribed = this._subscribedOnce;
    this._subscribedOnce = true;
    const previous = since ? { offset: since.offset, epoch: since.epoch } : null;
    const hasHistory = typeof reply.epoch === "string";
    // recovered:true keeps our offset: the missed messages follow this reply and advance it.
    // Otherwise nothing older is coming, so the channel's current top is where we stand.
    if (hasHistory && reply.recovered !== true) {
      this.epoch = reply.epoch;
      this.offset = Number.isFinite(reply.offset) ? reply.offset : 0;
    } else if (hasHistory) {
      this.epoch = reply.epoch;
    } else {
      this.epoch = null;
      this.offset = null;
    }
    const info = { channel: this.channel, resubscribed, recovered: reply.recovered === true, previous, offset: this.offset, epoch: this.epoch, reply };
    this._call("onSubscribed", info);
    if (!resubscribed) this._resolve(reply);
    // A gap: we asked to recover and the server could not (epoch changed, history too short),
    // or the channel no longer keeps history at all.
    if (previous && reply.recovered !== true) {
      this._call("onGap", { channel: this.channel, reason: hasHistory ? "not recovered" : "no history", previous, offset: this.offset, epoch: this.epoch });
    }
  }

  _refused(err) {
    this._state = "failed";
    this._reject(err);
    this._call("onError", err);
  }

  _deliver(m) {
    if (this._state === "unsubscribed") return;
    if (Number.isFinite(m.offset)) this.offset = m.offset;
    const msg = { channel: m.channel, data: m.data, offset: m.offset ?? null };
    if (m.encoding !== undefined) msg.encoding = m.encoding;
    if (m.user !== undefined) msg.user = m.user;
    if (m.info !== undefined) msg.info = m.info;
    this._call("onMessage", msg);
  }

  _presence(handler, m) {
    if (this._state === "unsubscribed") return;
    const p = { channel: m.channel, client: m.client };
    if (m.user !== undefined) p.user = m.user;
    if (m.info !== undefined) p.info = m.info;
    this._call(handler, p);
  }

  _call(name, arg) {
    try { this._handlers[name]?.(arg); } catch (e) { reportLater(e); }
  }
}

// A throwing handler must not break the client's own bookkeeping; rethrown on its own task, it
// still reaches the console and window.onerror.
function reportLater(e) { setTimeout(() => { throw e; }); }
