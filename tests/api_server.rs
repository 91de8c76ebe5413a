//! The server API (`--api-listen`, `--api-key`) against the real binary, over real sockets, with
//! a real redis-server where Redis is involved: every endpoint standalone and with Redis
//! (publishes and broadcasts reach WebSocket subscribers, raw and JSON, on this node and on
//! another; a disconnect closes the user's connections with 4002 on both nodes; channel counts;
//! the node's info), the key check, every error status, and a `publish = "server"` namespace that
//! refuses clients while the API's publishes reach its subscribers.
//!
//! No test bounds how soon anything happens: waits give up after PATIENCE. The one test that
//! waits for the API's own 10 s deadline only checks what happens when it passes.

mod ops_support;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use ops_support::*;
use serde_json::{json, Value};

/// A node with the API on, `--threads 2` so reactors have to cooperate, and `extra` flags.
fn api_node(extra: &[&str]) -> (Server, ApiClient) {
    let mut args = vec!["--threads", "2", "--token-hmac-secret", SECRET];
    args.extend_from_slice(&API_ARGS);
    args.extend_from_slice(extra);
    let server = Server::start(&args);
    let api = ApiClient::of(&server);
    (server, api)
}

fn token(sub: &str) -> String {
    hs256(&json!({"sub": sub, "exp": unix_now() + 600}))
}

fn envelope(channel: &str, data: Value) -> Value {
    json!({"op": "message", "channel": channel, "data": data})
}

/// A JSON client subscribed to `channel` (its `ok` received: with Redis, the node holds the
/// subscription).
fn json_subscriber(server: &Server, channel: &str, token: Option<&str>) -> Ws {
    let path = token.map_or("/ws".to_string(), |t| format!("/ws?token={t}"));
    let mut ws = Ws::connect(server.addr, &path, Some("fanout.json")).unwrap();
    subscribe(&mut ws, channel);
    ws
}

fn subscribe(ws: &mut Ws, channel: &str) {
    ws.send_text(&json!({"op":"subscribe","channel":channel,"id":"s"}).to_string());
    assert_eq!(
        ws.next_json(&format!("subscribe {channel}")),
        json!({"op":"ok","id":"s"})
    );
}

fn raw_subscriber(server: &Server, channel: &str, token: Option<&str>) -> Ws {
    let mut path = format!("/ws?channel={channel}");
    if let Some(t) = token {
        path.push_str(&format!("&token={t}"));
    }
    server.ws(&path)
}

/// A complete `/api/channels` answer from `nodes` nodes (standalone: 1).
fn listing(channels: Value, nodes: usize) -> Value {
    json!({
        "channels": channels,
        "truncated": false,
        "complete": true,
        "nodes": nodes,
        "nodes_expected": nodes,
    })
}

fn assert_ok(r: &ApiResponse, want: Value) {
    assert_eq!((r.status, &r.json), (200, &want), "{r:?}");
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/json")
    );
    assert_eq!(r.header("connection").as_deref(), Some("close"));
}

/// The client is still served: it publishes to its own channel (raw) and gets it back.
fn still_served(ws: &mut Ws, what: &str) {
    ws.send_text("still here");
    assert_eq!(ws.next_text(what), "still here", "{what}");
}

// ---------------------------------------------------------------------------------------------
// Standalone.

#[test]
fn publish_and_broadcast_reach_raw_and_json_subscribers_on_every_reactor() {
    let (server, api) = api_node(&[]);
    // Enough clients that both reactors have some (the kernel spreads them over the listeners).
    let mut raws: Vec<Ws> = (0..6)
        .map(|_| raw_subscriber(&server, "news", None))
        .collect();
    let mut jsons: Vec<Ws> = (0..4)
        .map(|_| json_subscriber(&server, "news", None))
        .collect();
    let mut sports = json_subscriber(&server, "sports", None);

    let cases: [(&[u8], &str, Value); 4] = [
        (
            br#"{"channel":"news","data":{"a":[1,2]}}"#,
            r#"{"a":[1,2]}"#,
            json!({"a":[1,2]}),
        ),
        (
            br#"{"channel":"news","data":"hello"}"#,
            "hello",
            json!("hello"),
        ),
        // Any other value publishes its JSON text as written, like a JSON client's publish.
        (
            br#"{"channel":"news","data": { "b" : true } }"#,
            r#"{ "b" : true }"#,
            json!({"b": true}),
        ),
        (br#"{"channel":"news","data":null}"#, "null", Value::Null),
    ];
    for (body, raw_text, data) in cases {
        let what = String::from_utf8_lossy(body).into_owned();
        assert_ok(&api.post_raw("/api/publish", body), json!({"ok": true}));
        for (i, ws) in raws.iter_mut().enumerate() {
            assert_eq!(ws.next_text(&format!("raw {i}, {what}")), raw_text);
        }
        for (i, ws) in jsons.iter_mut().enumerate() {
            // Exactly the envelope: the server's publish names no user.
            assert_eq!(
                ws.next_json(&format!("json {i}, {what}")),
                envelope("news", data.clone())
            );
        }
    }

    let r = api.post(
        "/api/broadcast",
        &json!({"channels":["news","sports","nobody-listens"],"data":"to all"}),
    );
    assert_ok(&r, json!({"ok": true, "channels": 3}));
    for ws in raws.iter_mut() {
        assert_eq!(ws.next_text("broadcast, raw"), "to all");
    }
    for ws in jsons.iter_mut() {
        assert_eq!(
            ws.next_json("broadcast, json"),
            envelope("news", json!("to all"))
        );
    }
    assert_eq!(
        sports.next_json("broadcast, sports"),
        envelope("sports", json!("to all"))
    );
    assert_eq!(
        server.metrics().get("fanout_bus_dropped_total"),
        0.0,
        "nothing was dropped between the API and the reactors"
    );
}

#[test]
fn channels_and_info_describe_the_node() {
    let (server, api) = api_node(&[]);
    let _a: Vec<Ws> = (0..3).map(|_| raw_subscriber(&server, "a", None)).collect();
    let _b = raw_subscriber(&server, "b", None);
    let mut both = json_subscriber(&server, "room:1", None);
    subscribe(&mut both, "a");

    let r = api.get("/api/channels");
    assert_ok(
        &r,
        listing(
            json!([
                {"name": "a", "subscribers": 4},
                {"name": "b", "subscribers": 1},
                {"name": "room:1", "subscribers": 1},
            ]),
            1,
        ),
    );
    assert_ok(
        &api.get("/api/channels?prefix=room%3A"),
        listing(json!([{"name": "room:1", "subscribers": 1}]), 1),
    );
    assert_ok(&api.get("/api/channels?prefix=zzz"), listing(json!([]), 1));
    let long = "p".repeat(129);
    api.get(&format!("/api/channels?prefix={long}")).error(400);

    let info = api.get("/api/info");
    assert_eq!(info.status, 200, "{info:?}");
    let node = info.json["node"].as_str().unwrap().to_string();
    assert!(
        node.len() == 16 && node.bytes().all(|b| b.is_ascii_hexdigit()),
        "node id {node:?}"
    );
    assert_eq!(info.json["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(info.json["broker"], "embedded");
    assert_eq!(info.json["connections"], 5);
    assert_eq!(info.json["ready"], true);
    assert!(info.json["uptime_seconds"].is_u64(), "{info:?}");
    assert_eq!(
        api.get("/api/info").json["node"],
        node.as_str(),
        "the id stays"
    );

    let (_other, other_api) = api_node(&[]);
    assert_ne!(
        other_api.get("/api/info").json["node"],
        node.as_str(),
        "each node has its own id"
    );
}

#[test]
fn the_api_key_is_checked_and_several_keys_may_be_given() {
    const OTHER: &str = "a-second-api-key-for-rotation";
    // Keys from the environment, comma-separated; the address from the flag.
    let server = Server::start_with_env(
        &["--api-listen", "127.0.0.1:0"],
        &[("FANOUT_API_KEY", &format!("{API_KEY},{OTHER}"))],
    );
    let api = ApiClient::of(&server);
    assert_eq!(api.get("/api/info").status, 200);
    assert_eq!(api.with_key(Some(OTHER)).get("/api/info").status, 200);

    let anonymous = api.with_key(None);
    for (what, r) in [
        ("GET without a key", anonymous.get("/api/info")),
        (
            "POST without a key",
            anonymous.post("/api/publish", &json!({"channel":"c","data":1})),
        ),
        (
            "wrong key",
            api.with_key(Some("fanout-test-api-key-012345678X"))
                .get("/api/info"),
        ),
        (
            "a prefix of the key",
            api.with_key(Some(&API_KEY[..20])).get("/api/channels"),
        ),
        (
            "the key as a bearer token",
            anonymous.request(
                "GET",
                "/api/info",
                &format!("Authorization: Bearer {API_KEY}\r\n"),
                b"",
            ),
        ),
    ] {
        let why = r.error(401);
        assert!(why.contains("apikey"), "{what}: {why}");
        assert!(!r.text.contains("012345678X"), "{what}: echoes the key");
        assert_eq!(
            r.header("www-authenticate").as_deref(),
            Some("apikey"),
            "{what}"
        );
    }
    // The scheme's case does not matter.
    let r = anonymous.request(
        "GET",
        "/api/info",
        &format!("Authorization: APIKEY {API_KEY}\r\n"),
        b"",
    );
    assert_eq!(r.status, 200, "{r:?}");

    // The description of the API is public, and is the document in the repository.
    let doc = anonymous.get("/api/openapi.json");
    assert_eq!(doc.status, 200, "{doc:?}");
    let in_repo: Value = serde_json::from_str(include_str!("../src/api/openapi.json")).unwrap();
    assert_eq!(doc.json, in_repo);
    assert_eq!(doc.json["openapi"], "3.1.0");
    for path in [
        "/api/publish",
        "/api/broadcast",
        "/api/disconnect",
        "/api/channels",
        "/api/info",
    ] {
        assert!(doc.json["paths"][path].is_object(), "{path} not described");
    }
}

#[test]
fn bad_api_options_stop_the_node_naming_the_option() {
    for (args, env, option) in [
        (&["--api-listen", "127.0.0.1:0"][..], &[][..], "--api-key"),
        (
            &["--api-listen", "127.0.0.1:0", "--api-key", "too-short"],
            &[],
            "--api-key",
        ),
        (
            &["--api-listen", "127.0.0.1:0"],
            &[("FANOUT_API_KEY", "")],
            "--api-key",
        ),
        (
            &["--api-listen", "nowhere", "--api-key", API_KEY],
            &[],
            "--api-listen",
        ),
    ] {
        let mut all = args.to_vec();
        all.extend(["--listen", "127.0.0.1:0"]);
        let (code, stdout, stderr) = run_to_exit(&all, env);
        assert_eq!(code, Some(2), "{args:?}: stderr {stderr:?}");
        assert!(
            stderr.contains(option),
            "{args:?}: {stderr:?} names {option}"
        );
        assert!(!stderr.contains("too-short"), "{stderr:?} echoes a key");
        assert!(
            !stdout.contains("listening on"),
            "{args:?} started: {stdout}"
        );
    }
}

#[test]
fn every_bad_request_gets_its_status_and_a_json_error() {
    let (server, api) = api_node(&["--max-message", "1024"]);
    let ok_publish = json!({"channel":"c","data":"x"});

    // 404 and 405 (with Allow).
    assert!(api.get("/api/nope").error(404).contains("/api/publish"));
    api.get("/").error(404);
    api.get("/ws").error(404);
    let r = api.get("/api/publish");
    r.error(405);
    assert_eq!(r.header("allow").as_deref(), Some("POST"));
    let r = api.post("/api/info", &json!({}));
    r.error(405);
    assert_eq!(r.header("allow").as_deref(), Some("GET"));
    assert_eq!(
        api.request("DELETE", "/api/channels", "", b"")
            .header("allow")
            .as_deref(),
        Some("GET")
    );

    // 415: a POST body that is not labelled JSON.
    let body = ok_publish.to_string();
    api.request("POST", "/api/publish", "", body.as_bytes())
        .error(415);
    api.request(
        "POST",
        "/api/publish",
        "Content-Type: text/plain\r\n",
        body.as_bytes(),
    )
    .error(415);
    // Parameters of the media type are fine.
    let r = api.request(
        "POST",
        "/api/publish",
        "Content-Type: application/json; charset=utf-8\r\n",
        body.as_bytes(),
    );
    assert_eq!(r.status, 200, "{r:?}");

    // 400: bodies that are not what the endpoint takes.
    for (path, body, says) in [
        ("/api/publish", &b"not json"[..], "invalid JSON body"),
        ("/api/publish", b"", "invalid JSON body"),
        ("/api/publish", br#"["c","x"]"#, "invalid JSON body"),
        ("/api/publish", br#"{"channel":"c"}"#, "data"),
        ("/api/publish", br#"{"data":1}"#, "channel"),
        (
            "/api/publish",
            br#"{"channel":"c","data":1,"chanel":"d"}"#,
            "chanel",
        ),
        (
            "/api/publish",
            br#"{"channel":7,"data":1}"#,
            "invalid JSON body",
        ),
        (
            "/api/publish",
            br#"{"channel":"bad name","data":1}"#,
            "channel name contains ' '",
        ),
        ("/api/publish", br#"{"channel":"","data":1}"#, "empty"),
        (
            "/api/broadcast",
            br#"{"channels":[],"data":1}"#,
            "1 to 1000",
        ),
        (
            "/api/broadcast",
            br#"{"channels":["ok","no/pe"],"data":1}"#,
            "channels[1]",
        ),
        (
            "/api/broadcast",
            br#"{"channel":"c","data":1}"#,
            "invalid JSON body",
        ),
        ("/api/disconnect", br#"{"user":""}"#, "user"),
        ("/api/disconnect", br#"{"user":42}"#, "invalid JSON body"),
    ] {
        let why = api.post_raw(path, body).error(400);
        assert!(
            why.contains(says),
            "{path} {}: {why:?} should say {says:?}",
            String::from_utf8_lossy(body)
        );
    }
    let many: Vec<String> = (0..1001).map(|i| format!("c{i}")).collect();
    assert!(api
        .post("/api/broadcast", &json!({"channels": many, "data": 1}))
        .error(400)
        .contains("1001"));
    let long_user = "u".repeat(257);
    api.post("/api/disconnect", &json!({ "user": long_user }))
        .error(400);

    // 413: a body over 1 MiB (refused from its Content-Length, without reading it), and data
    // over --max-message.
    let big = vec![b'x'; (1 << 20) + 1];
    assert!(api
        .post_raw("/api/publish", &big)
        .error(413)
        .contains("1 MiB"));
    let r = api.post(
        "/api/publish",
        &json!({"channel":"c","data":"y".repeat(1025)}),
    );
    assert!(r.error(413).contains("--max-message"), "{r:?}");

    // 411: chunked bodies are not taken.
    let chunked = "POST /api/publish HTTP/1.1\r\nHost: api\r\nAuthorization: apikey {K}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        .replace("{K}", API_KEY);
    assert!(api
        .raw(chunked.as_bytes())
        .error(411)
        .contains("Content-Length"));

    // 431 and 400 for the head itself.
    let huge = format!(
        "GET /api/info HTTP/1.1\r\nHost: api\r\nX-Pad: {}\r\n\r\n",
        "p".repeat(9000)
    );
    api.raw(huge.as_bytes()).error(431);
    api.raw(b"\x00\x01 garbage\r\n\r\n").error(400);
    api.raw(
        b"POST /api/publish HTTP/1.1\r\nContent-Length: lots\r\nContent-Type: application/json\r\n\r\n",
    )
    .error(400);

    // `Expect: 100-continue` gets the interim answer before the body is sent.
    let mut s = TcpStream::connect(api.addr).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let body = ok_publish.to_string();
    write!(
        s,
        "POST /api/publish HTTP/1.1\r\nHost: api\r\nAuthorization: apikey {API_KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        body.len()
    )
    .unwrap();
    assert!(read_head(&mut s).starts_with("HTTP/1.1 100 Continue\r\n"));
    s.write_all(body.as_bytes()).unwrap();
    assert!(read_head(&mut s).starts_with("HTTP/1.1 200 OK\r\n"));

    // The node and its API still serve.
    assert_eq!(api.get("/api/info").status, 200);
    assert_eq!(server.get("/healthz").0, 200);
}

#[test]
fn metrics_count_api_requests_by_route_and_status() {
    let (server, api) = api_node(&[]);
    let m = server.metrics();
    assert_eq!(
        m.types.get("fanout_api_requests_total").map(String::as_str),
        Some("counter")
    );
    assert!(
        !m.samples
            .keys()
            .any(|k| k.starts_with("fanout_api_requests_total{")),
        "no request answered yet: no pair"
    );
    assert_eq!(m.get("fanout_api_requests_waiting"), 0.0);
    assert_eq!(m.get("fanout_api_answers_pending"), 0.0);

    let _sub = raw_subscriber(&server, "news", None);
    for _ in 0..3 {
        assert_ok(
            &api.post("/api/publish", &json!({"channel":"news","data":1})),
            json!({"ok": true}),
        );
    }
    assert_eq!(api.get("/api/channels").status, 200);
    assert_eq!(api.get("/api/info").status, 200);
    assert_eq!(api.get("/api/openapi.json").status, 200);
    api.with_key(None).get("/api/info").error(401);
    api.post("/api/info", &json!({})).error(405);
    api.post_raw("/api/publish", b"[1]").error(400);
    api.get("/api/nope").error(404);
    api.raw(b"\0\0 nonsense\r\n\r\n").error(400);

    let m = server.metrics();
    let n = |route: &str, status: &str| {
        m.get(&format!(
            "fanout_api_requests_total{{route=\"{route}\",status=\"{status}\"}}"
        ))
    };
    assert_eq!(n("publish", "200"), 3.0);
    assert_eq!(n("channels", "200"), 1.0);
    assert_eq!(n("info", "200"), 1.0);
    assert_eq!(n("openapi", "200"), 1.0);
    assert_eq!(n("info", "401"), 1.0);
    assert_eq!(n("info", "405"), 1.0);
    assert_eq!(n("publish", "400"), 1.0);
    // An unknown path and a malformed head name no route.
    assert_eq!(n("none", "404"), 1.0);
    assert_eq!(n("none", "400"), 1.0);
    let total: f64 = m
        .samples
        .iter()
        .filter(|(k, _)| k.starts_with("fanout_api_requests_total{"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(total, 11.0, "nothing else counted");
    assert_eq!(m.get("fanout_api_requests_waiting"), 0.0);
    assert_eq!(m.get("fanout_api_answers_pending"), 0.0);
}

#[test]
fn api_connections_are_bounded_and_a_request_that_never_ends_gets_408() {
    let (server, api) = api_node(&[]);
    // 64 connections that never finish their request hold every slot of the API.
    let mut stalled: Vec<TcpStream> = (0..64)
        .map(|_| {
            let mut s = TcpStream::connect(api.addr).unwrap();
            s.write_all(b"POST /api/publish HTTP/1.1\r\nHost: api\r\n")
                .unwrap();
            s
        })
        .collect();
    // The next one is refused at once; the WebSocket port does not care.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let r = api.get("/api/info");
        if r.status == 503 {
            assert!(r.error(503).contains("64"), "{r:?}");
            break;
        }
        // The API may not have accepted all 64 yet.
        assert!(
            Instant::now() < deadline,
            "no 503 with 64 connections held: {r:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(server.get("/healthz").0, 200);

    // Each stalled request is answered 408 when its deadline passes, and closed.
    for s in stalled.iter_mut() {
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        let head = read_head(s);
        assert!(head.starts_with("HTTP/1.1 408 "), "{head}");
    }
    // Their slots are free again.
    let deadline = Instant::now() + PATIENCE;
    while api.get("/api/info").status != 200 {
        assert!(Instant::now() < deadline, "the API stayed full");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_server_only_namespace_refuses_clients_but_takes_the_api() {
    let dir = std::env::temp_dir().join(format!(
        "fanout-api-ns-{}-{}",
        std::process::id(),
        free_port()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("fanout.toml");
    // The API is configured in the file too, like any option.
    std::fs::write(
        &file,
        format!(
            r#"
api_listen = "127.0.0.1:0"
api_key = ["{API_KEY}", "another-key-0123456789"]
token_hmac_secret = "{SECRET}"

[[namespace]]
name = "announce:*"
subscribe = "anyone"
publish = "server"
"#
        ),
    )
    .unwrap();
    let server = Server::start(&["--threads", "2", "--config", file.to_str().unwrap()]);
    let api = ApiClient::of(&server);
    assert_eq!(
        api.with_key(Some("another-key-0123456789"))
            .get("/api/info")
            .status,
        200
    );
    let user = token("42");
    let mut listener = json_subscriber(&server, "announce:all", Some(&user));
    let mut raw_listener = raw_subscriber(&server, "announce:all", None);

    // A client may not publish there, with a token or without.
    listener.send_text(
        &json!({"op":"publish","channel":"announce:all","data":"spoof","id":"p"}).to_string(),
    );
    let reply = listener.next_json("client publish to a server namespace");
    assert_eq!(reply["op"], "error", "{reply}");
    let why = reply["error"].as_str().unwrap();
    assert!(why.contains("forbidden") && why.contains("server"), "{why}");
    let mut raw_publisher = raw_subscriber(&server, "announce:all", None);
    raw_publisher.send_text("spoof");
    assert_eq!(
        raw_publisher.recv_close(PATIENCE).unwrap(),
        (4003, "forbidden".to_string())
    );

    // The server may.
    assert_ok(
        &api.post(
            "/api/publish",
            &json!({"channel":"announce:all","data":{"text":"maintenance at noon"}}),
        ),
        json!({"ok": true}),
    );
    assert_eq!(
        listener.next_json("the API's announcement"),
        envelope("announce:all", json!({"text":"maintenance at noon"})),
        "delivered, and naming no user"
    );
    assert_eq!(
        raw_listener.next_text("the API's announcement, raw"),
        r#"{"text":"maintenance at noon"}"#
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn disconnect_closes_every_connection_of_the_user_with_4002() {
    let (server, api) = api_node(&[]);
    let (u42, u43) = (token("42"), token("43"));
    let mut of_42 = [
        raw_subscriber(&server, "room", Some(&u42)),
        raw_subscriber(&server, "room", Some(&u42)),
        json_subscriber(&server, "room", Some(&u42)),
        json_subscriber(&server, "other", Some(&u42)),
    ];
    let mut other_user = raw_subscriber(&server, "room", Some(&u43));
    let mut anonymous = raw_subscriber(&server, "lobby", None);

    assert_ok(
        &api.post("/api/disconnect", &json!({"user":"42"})),
        json!({"ok": true, "closed": 4}),
    );
    for (i, ws) in of_42.iter_mut().enumerate() {
        assert_eq!(
            ws.recv_close(PATIENCE)
                .unwrap_or_else(|e| panic!("client {i} of user 42: {e}")),
            (4002, "disconnected by the server".to_string()),
            "client {i} of user 42"
        );
    }
    still_served(&mut anonymous, "anonymous client");
    // (The raw client of 43 also gets its own message back on `room`.)
    still_served(&mut other_user, "user 43");

    assert_eq!(
        server.wait_metric(
            r#"fanout_connections_closed_total{reason="disconnected"}"#,
            4.0,
            PATIENCE
        ),
        4.0
    );
    assert_eq!(
        server.wait_metric("fanout_connections_open", 2.0, PATIENCE),
        2.0
    );
    // Nothing left to close; disconnecting is safe to repeat.
    assert_ok(
        &api.post("/api/disconnect", &json!({"user":"42"})),
        json!({"ok": true, "closed": 0}),
    );
    assert_ok(
        &api.post("/api/disconnect", &json!({"user":"nobody"})),
        json!({"ok": true, "closed": 0}),
    );
}

// ---------------------------------------------------------------------------------------------
// With Redis.

/// A node on `redis` with `--threads 2` and a token secret (and the API when `api`), ready.
fn redis_node(redis: &Redis, api: bool, extra: &[&str]) -> Server {
    let url = redis.url();
    let mut args = vec![
        "--threads",
        "2",
        "--redis",
        &url,
        "--token-hmac-secret",
        SECRET,
    ];
    if api {
        args.extend_from_slice(&API_ARGS);
    }
    args.extend_from_slice(extra);
    Server::start_ready(&args)
}

/// Waits until `nodes` nodes subscribe the control channel (under `prefix`) in Redis.
fn wait_control_subscribed(redis: &Redis, prefix: &str, nodes: i64) {
    let channel = format!("{prefix}{CONTROL_CHANNEL}");
    assert_eq!(
        redis.wait_numsub(&channel, nodes, PATIENCE),
        nodes,
        "nodes subscribed to {channel}"
    );
}

#[test]
fn with_redis_publish_broadcast_and_disconnect_reach_another_node() {
    let redis = Redis::start();
    let a = redis_node(&redis, true, &[]);
    // The other node has no API of its own: it still takes disconnects through Redis.
    let b = redis_node(&redis, false, &[]);
    let api = ApiClient::of(&a);
    wait_control_subscribed(&redis, "", 2);

    let mut json_a = json_subscriber(&a, "news", None);
    let mut json_b = json_subscriber(&b, "news", None);
    subscribe(&mut json_b, "other");
    let mut raw_a = raw_subscriber(&a, "news", None);
    let mut raw_b = raw_subscriber(&b, "news", None);
    // Raw clients have no `ok`: both nodes hold the Redis subscription once NUMSUB says so.
    assert_eq!(redis.wait_numsub("news", 2, PATIENCE), 2);

    assert_ok(
        &api.post("/api/publish", &json!({"channel":"news","data":{"n":1}})),
        json!({"ok": true}),
    );
    for (what, ws) in [("node a", &mut json_a), ("node b", &mut json_b)] {
        assert_eq!(
            ws.next_json(what),
            envelope("news", json!({"n":1})),
            "{what}"
        );
    }
    for (what, ws) in [("node a, raw", &mut raw_a), ("node b, raw", &mut raw_b)] {
        assert_eq!(ws.next_text(what), r#"{"n":1}"#, "{what}");
    }

    assert_ok(
        &api.post(
            "/api/broadcast",
            &json!({"channels":["news","other"],"data":"both"}),
        ),
        json!({"ok": true, "channels": 2}),
    );
    let mut got = vec![
        json_b.next_json("broadcast on b"),
        json_b.next_json("broadcast on b"),
    ];
    got.sort_by_key(|v| v["channel"].as_str().map(str::to_string));
    assert_eq!(
        got,
        [
            envelope("news", json!("both")),
            envelope("other", json!("both"))
        ]
    );
    assert_eq!(
        json_a.next_json("broadcast on a"),
        envelope("news", json!("both"))
    );
    assert_eq!(raw_b.next_text("broadcast on b, raw"), "both");
    assert_eq!(raw_a.next_text("broadcast on a, raw"), "both");

    // Channels are every node's (node b has no API but answers); info says which broker.
    let channels = api.get("/api/channels");
    assert_ok(
        &channels,
        listing(
            json!([
                {"name": "news", "subscribers": 4},
                {"name": "other", "subscribers": 1},
            ]),
            2,
        ),
    );
    let info = api.get("/api/info");
    assert_eq!(
        (info.json["broker"].as_str(), info.json["ready"].as_bool()),
        (Some("redis"), Some(true))
    );
    assert_eq!(info.json["connections"], 2);

    // A disconnect closes the user's connections on both nodes.
    let (u42, u43) = (token("42"), token("43"));
    let mut on_a = json_subscriber(&a, "room", Some(&u42));
    let mut on_b = [
        json_subscriber(&b, "room", Some(&u42)),
        raw_subscriber(&b, "room", Some(&u42)),
    ];
    let mut bystander = raw_subscriber(&b, "lobby", Some(&u43));
    assert_ok(
        &api.post("/api/disconnect", &json!({"user":"42"})),
        json!({"ok": true, "closed": 1}),
    );
    let closed = (4002, "disconnected by the server".to_string());
    assert_eq!(on_a.recv_close(PATIENCE).unwrap(), closed, "on node a");
    for (i, ws) in on_b.iter_mut().enumerate() {
        assert_eq!(
            ws.recv_close(PATIENCE).unwrap(),
            closed,
            "client {i} on node b"
        );
    }
    still_served(&mut bystander, "user 43 on node b");
    assert_eq!(
        b.wait_metric(
            r#"fanout_connections_closed_total{reason="disconnected"}"#,
            2.0,
            PATIENCE
        ),
        2.0
    );
    assert!(
        !a.log().contains("disconnecting user"),
        "node a acted on its own message through Redis:\n{}",
        a.log()
    );

    // The wire form is documented: any Redis client may send it (and bad ones are ignored).
    redis.publish(CONTROL_CHANNEL, b"not a control message");
    let mut late = raw_subscriber(&b, "room", Some(&u42));
    redis.publish(
        CONTROL_CHANNEL,
        json!({"op":"disconnect","user":"42","node":"redis-cli"})
            .to_string()
            .as_bytes(),
    );
    assert_eq!(
        late.recv_close(PATIENCE).unwrap(),
        closed,
        "disconnect from redis-cli"
    );
    assert!(b.wait_log("ignored a message on the control channel", PATIENCE));
    still_served(&mut bystander, "user 43 after the bad control message");
}

#[test]
fn the_control_channel_is_prefixed_and_no_client_can_use_it() {
    let redis = Redis::start();
    let a = redis_node(&redis, true, &["--redis-prefix", "app1:"]);
    wait_control_subscribed(&redis, "app1:", 1);
    let node = ApiClient::of(&a).get("/api/info").json["node"]
        .as_str()
        .unwrap()
        .to_string();
    let reply = format!("app1:__fanout/reply/{node}");
    assert_eq!(redis.wait_numsub(&reply, 1, PATIENCE), 1, "{reply}");
    let mut all: Vec<String> = redis
        .call(&[b"PUBSUB", b"CHANNELS"])
        .items()
        .iter()
        .map(Reply::text)
        .collect();
    all.sort();
    assert_eq!(
        all,
        ["app1:__fanout/control".to_string(), reply],
        "only the control channel and the API node's census replies, prefixed"
    );
    assert_eq!(
        a.metrics().get("fanout_redis_subscriptions"),
        0.0,
        "no client channel"
    );

    let mut client = a.ws_json("/ws");
    for op in ["subscribe", "publish"] {
        client.send_text(
            &json!({"op": op, "channel": CONTROL_CHANNEL, "data": "x", "id": op}).to_string(),
        );
        let reply = client.next_json(op);
        assert_eq!(reply["op"], "error", "{op}: {reply}");
    }
    let api = ApiClient::of(&a);
    api.post(
        "/api/publish",
        &json!({"channel": CONTROL_CHANNEL, "data": "x"}),
    )
    .error(400);
}

#[test]
fn with_redis_down_publishes_and_disconnects_get_503_with_the_reason() {
    let mut redis = Redis::start();
    let a = redis_node(&redis, true, &[]);
    let api = ApiClient::of(&a);
    wait_control_subscribed(&redis, "", 1);
    let u42 = token("42");
    let mut user = raw_subscriber(&a, "room", Some(&u42));

    redis.kill();
    assert!(
        wait_status(a.addr, "/readyz", 503, PATIENCE).is_some(),
        "node still ready without Redis"
    );
    let why = api
        .post("/api/publish", &json!({"channel":"news","data":"lost"}))
        .error(503);
    assert!(why.contains("redis unavailable"), "{why}");
    let why = api
        .post(
            "/api/broadcast",
            &json!({"channels":["a","b"],"data":"lost"}),
        )
        .error(503);
    assert!(why.contains("0 of 2 channels published"), "{why}");
    assert_eq!(api.get("/api/info").json["ready"], false);
    // A disconnect still closes the user here, and says the other nodes were not told.
    let why = api
        .post("/api/disconnect", &json!({"user":"42"}))
        .error(503);
    assert!(
        why.contains("redis unavailable") && why.contains("1 connections closed on this node"),
        "{why}"
    );
    assert_eq!(
        user.recv_close(PATIENCE).unwrap(),
        (4002, "disconnected by the server".to_string())
    );

    redis.restart();
    assert!(
        wait_status(a.addr, "/readyz", 200, PATIENCE).is_some(),
        "node not ready again"
    );
    let mut listener = json_subscriber(&a, "news", None);
    assert_ok(
        &api.post("/api/publish", &json!({"channel":"news","data":"back"})),
        json!({"ok": true}),
    );
    assert_eq!(
        listener.next_json("after the restart"),
        envelope("news", json!("back"))
    );
    wait_control_subscribed(&redis, "", 1);
}

/// The `(name, subscribers)` pairs of an `/api/channels` answer, and its other fields.
fn counts(r: &ApiResponse) -> (Vec<(String, u64)>, bool, u64, Value) {
    assert_eq!(r.status, 200, "{r:?}");
    let list = r.json["channels"]
        .as_array()
        .unwrap_or_else(|| panic!("no channels in {r:?}"))
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_string(),
                c["subscribers"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(r.json["truncated"], false, "{r:?}");
    (
        list,
        r.json["complete"].as_bool().unwrap(),
        r.json["nodes"].as_u64().unwrap(),
        r.json["nodes_expected"].clone(),
    )
}

fn pairs(list: &[(&str, u64)]) -> Vec<(String, u64)> {
    list.iter().map(|(n, c)| (n.to_string(), *c)).collect()
}

#[test]
fn with_redis_channels_are_counted_on_every_node_and_a_silent_node_is_reported() {
    let redis = Redis::start();
    let a = redis_node(&redis, true, &[]);
    // Nodes without an API answer too.
    let b = redis_node(&redis, false, &[]);
    let mut c = redis_node(&redis, false, &[]);
    let api = ApiClient::of(&a);
    wait_control_subscribed(&redis, "", 3);
    let node = api.get("/api/info").json["node"]
        .as_str()
        .unwrap()
        .to_string();

    // news: 2 on a, 3 on b (a few clients, so both of b's reactors are likely to have some),
    // 1 on c; room:b and room:c on one node each.
    let _clients = [
        raw_subscriber(&a, "news", None),
        json_subscriber(&a, "news", None),
        raw_subscriber(&b, "news", None),
        raw_subscriber(&b, "news", None),
        json_subscriber(&b, "news", None),
        json_subscriber(&b, "room:b", None),
        raw_subscriber(&c, "news", None),
        raw_subscriber(&c, "room:c", None),
    ];
    let every = pairs(&[("news", 6), ("room:b", 1), ("room:c", 1)]);
    assert_eq!(
        counts(&api.get("/api/channels")),
        (every.clone(), true, 3, json!(3))
    );
    assert_eq!(
        counts(&api.get("/api/channels?prefix=room%3A")),
        (pairs(&[("room:b", 1), ("room:c", 1)]), true, 3, json!(3))
    );
    // What anyone may publish on the reply channel cannot confuse it: not a part, or a part of
    // no request under way.
    let reply = format!("__fanout/reply/{node}");
    assert_eq!(redis.publish(&reply, b"not a part"), 1);
    let stray = json!({"op":"channels","req":999_999,"node":"x","reactor":0,"reactors":1,
        "channels":[["news",1000]],"truncated":false});
    assert_eq!(redis.publish(&reply, stray.to_string().as_bytes()), 1);
    assert_eq!(
        counts(&api.get("/api/channels")),
        (every.clone(), true, 3, json!(3))
    );

    // A node that stopped answering (but is still subscribed: SIGSTOP) leaves the answer
    // incomplete once the census gives up waiting, and its counts out.
    c.signal("STOP");
    let without_c = pairs(&[("news", 5), ("room:b", 1)]);
    assert_eq!(
        counts(&api.get("/api/channels")),
        (without_c.clone(), false, 2, json!(3))
    );
    // At most two such lists at once: while two wait, a third is refused.
    let waiting: Vec<_> = (0..2)
        .map(|_| {
            let api = api.clone();
            std::thread::spawn(move || api.get("/api/channels"))
        })
        .collect();
    assert_eq!(
        a.wait_metric("fanout_api_requests_waiting", 2.0, PATIENCE),
        2.0
    );
    let why = api.get("/api/channels").error(429);
    assert!(why.contains("cluster-wide channel lists"), "{why}");
    for t in waiting {
        let r = t.join().unwrap();
        assert_eq!(counts(&r), (without_c.clone(), false, 2, json!(3)));
    }
    // Woken up, it answers the requests it missed late; those answers change nothing, and the
    // next list is whole again.
    c.signal("CONT");
    let give_up = Instant::now() + PATIENCE;
    loop {
        let r = api.get("/api/channels");
        if counts(&r).1 {
            assert_eq!(counts(&r), (every.clone(), true, 3, json!(3)));
            break;
        }
        assert!(
            Instant::now() < give_up,
            "node c never answered again: {r:?}"
        );
    }

    // A node that is gone is not waited for: Redis says the request reached two nodes.
    c.signal("KILL");
    assert!(c.wait_exit(PATIENCE).is_some());
    wait_control_subscribed(&redis, "", 2);
    assert_eq!(
        counts(&api.get("/api/channels")),
        (without_c, true, 2, json!(2))
    );
    assert_eq!(
        a.metrics()
            .get(r#"fanout_api_requests_total{route="channels",status="429"}"#),
        1.0
    );
}

#[test]
fn with_redis_down_channels_are_this_nodes_and_say_so() {
    let mut redis = Redis::start();
    let a = redis_node(&redis, true, &[]);
    let api = ApiClient::of(&a);
    wait_control_subscribed(&redis, "", 1);
    let _sub = raw_subscriber(&a, "news", None);
    redis.kill();
    assert!(wait_status(a.addr, "/readyz", 503, PATIENCE).is_some());
    let r = api.get("/api/channels");
    assert_eq!(
        counts(&r),
        (pairs(&[("news", 1)]), false, 1, Value::Null),
        "{r:?}"
    );
    let why = r.json["reason"].as_str().unwrap_or_default();
    assert!(why.contains("redis unavailable"), "{r:?}");
}

#[test]
fn with_a_redis_cluster_publish_broadcast_and_disconnect_reach_another_node() {
    let cluster = RedisCluster::start(3, 0);
    let mut with_api = vec!["--token-hmac-secret", SECRET];
    with_api.extend_from_slice(&API_ARGS);
    let a = cluster.node(2, &with_api);
    let b = cluster.node(2, &["--token-hmac-secret", SECRET]);
    let api = ApiClient::of(&a);
    // Each node SSUBSCRIBEs the control channel on the shard that owns its slot.
    assert_eq!(cluster.wait_shardnumsub(CONTROL_CHANNEL, 2), 2);
    assert_eq!(api.get("/api/info").json["broker"], "redis-cluster");

    // One channel per shard, a JSON subscriber to each on the other node.
    let channels = cluster.channels_on_every_shard("", 3);
    let mut on_b: Vec<Ws> = channels
        .iter()
        .map(|c| json_subscriber(&b, c, None))
        .collect();
    let mut on_a = json_subscriber(&a, &channels[0], None);
    assert_ok(
        &api.post(
            "/api/publish",
            &json!({"channel": channels[0], "data": [1]}),
        ),
        json!({"ok": true}),
    );
    assert_eq!(on_a.next_json("node a"), envelope(&channels[0], json!([1])));
    assert_eq!(
        on_b[0].next_json("node b"),
        envelope(&channels[0], json!([1]))
    );
    assert_ok(
        &api.post(
            "/api/broadcast",
            &json!({"channels": channels, "data": "all shards"}),
        ),
        json!({"ok": true, "channels": 3}),
    );
    for (ws, channel) in on_b.iter_mut().zip(&channels) {
        assert_eq!(
            ws.next_json(channel),
            envelope(channel, json!("all shards")),
            "{channel}"
        );
    }
    assert_eq!(
        on_a.next_json("node a, broadcast"),
        envelope(&channels[0], json!("all shards"))
    );

    let u42 = token("42");
    let mut users = [
        raw_subscriber(&a, "room", Some(&u42)),
        raw_subscriber(&b, "room", Some(&u42)),
    ];
    assert_ok(
        &api.post("/api/disconnect", &json!({"user":"42"})),
        json!({"ok": true, "closed": 1}),
    );
    for (i, ws) in users.iter_mut().enumerate() {
        assert_eq!(
            ws.recv_close(PATIENCE).unwrap(),
            (4002, "disconnected by the server".to_string()),
            "client {i}"
        );
    }
}

#[test]
fn with_a_redis_cluster_channels_are_counted_on_every_node() {
    let cluster = RedisCluster::start(3, 0);
    let mut with_api = vec!["--token-hmac-secret", SECRET];
    with_api.extend_from_slice(&API_ARGS);
    let a = cluster.node(2, &with_api);
    let mut b = cluster.node(2, &["--token-hmac-secret", SECRET]);
    let api = ApiClient::of(&a);
    assert_eq!(cluster.wait_shardnumsub(CONTROL_CHANNEL, 2), 2);
    // The API node's reply channel lives on its own slot's shard, like any channel.
    let node = api.get("/api/info").json["node"]
        .as_str()
        .unwrap()
        .to_string();
    let reply = format!("__fanout/reply/{node}");
    assert_eq!(cluster.wait_shardnumsub(&reply, 1), 1, "{reply}");

    // One channel per shard: each has a subscriber on b, the first two more on a and b.
    let channels = cluster.channels_on_every_shard("", 3);
    let mut clients: Vec<Ws> = channels
        .iter()
        .map(|c| raw_subscriber(&b, c, None))
        .collect();
    clients.push(raw_subscriber(&a, &channels[0], None));
    clients.push(json_subscriber(&b, &channels[0], None));
    let mut want: Vec<(String, u64)> = channels
        .iter()
        .enumerate()
        .map(|(i, c)| (c.clone(), if i == 0 { 3 } else { 1 }))
        .collect();
    want.sort();
    assert_eq!(counts(&api.get("/api/channels")), (want, true, 2, json!(2)));

    b.signal("KILL");
    assert!(b.wait_exit(PATIENCE).is_some());
    assert_eq!(cluster.wait_shardnumsub(CONTROL_CHANNEL, 1), 1);
    assert_eq!(
        counts(&api.get("/api/channels")),
        (vec![(channels[0].clone(), 1)], true, 1, json!(1))
    );
}

/// `GET /api/history` on `reader`'s API, after `publisher_node` had messages published by an
/// authenticated client and by the API.
fn history_endpoint(reader: &Server, publisher_node: &Server) {
    let api = ApiClient::of(reader);
    let token = token("42");
    let mut client = Ws::connect(
        publisher_node.addr,
        &format!("/ws?token={token}"),
        Some("fanout.json"),
    )
    .unwrap();
    for i in 0..3 {
        client.send_text(
            &json!({"op":"publish","channel":"chat:h","data":{"n":i},"id":i}).to_string(),
        );
        assert_eq!(client.next_json("publish ok")["op"], "ok");
    }
    assert_ok(
        &api.post(
            "/api/publish",
            &json!({"channel":"chat:h","data":"from the backend"}),
        ),
        json!({"ok": true}),
    );
    let answer = api.get("/api/history?channel=chat:h&limit=3");
    assert_eq!(answer.status, 200, "{answer:?}");
    let body = &answer.json;
    assert_eq!(body["channel"], "chat:h");
    assert_eq!(body["offset"], 4);
    assert!(body["epoch"].is_string());
    assert_eq!(
        body["messages"],
        json!([
            {"data": {"n": 1}, "user": "42", "offset": 2},
            {"data": {"n": 2}, "user": "42", "offset": 3},
            {"data": "from the backend", "offset": 4},
        ])
    );
    let default = api.get("/api/history?channel=chat:h");
    assert_eq!(default.json["messages"].as_array().unwrap().len(), 4);
    assert!(api
        .get("/api/history?channel=plain")
        .error(400)
        .contains("history is off"));
    assert!(api.get("/api/history").error(400).contains("channel"));
    assert!(api
        .get("/api/history?channel=chat:h&limit=0")
        .error(400)
        .contains("limit"));
    assert!(api
        .get("/api/history?channel=no%20spaces")
        .error(400)
        .contains("channel"));
}

const HISTORY_NAMESPACE: &str =
    "[[namespace]]\nname = \"chat:*\"\nhistory_size = 100\nhistory_ttl = 60\n";

#[test]
fn history_standalone() {
    let config = ConfigFile::new("api_history", HISTORY_NAMESPACE);
    let (server, _) = api_node(&["--config", config.path()]);
    history_endpoint(&server, &server);
}

#[test]
fn history_on_redis_reads_what_another_node_published() {
    let redis = Redis::start();
    let config = ConfigFile::new("api_history_redis", HISTORY_NAMESPACE);
    let a = redis_node(&redis, true, &["--config", config.path()]);
    let b = redis_node(&redis, false, &["--config", config.path()]);
    history_endpoint(&a, &b);
}
