//! Fuzzes the HTTP request parser and the WebSocket upgrade checks with arbitrary bytes.
//!
//! Whatever a client sends before the handshake must end in a request, a "read more" or an
//! error response with a status, never a panic. Accepted requests go on through the upgrade
//! checks and the query decoder, which see attacker-controlled strings too.
#![no_main]

use std::sync::OnceLock;

use fanout::config::Config;
use fanout::http;
use libfuzzer_sys::fuzz_target;

fn config() -> &'static Config {
    static CONFIG: OnceLock<Config> = OnceLock::new();
    CONFIG.get_or_init(Config::for_tests)
}

fuzz_target!(|data: &[u8]| {
    match http::parse(data) {
        Ok(Some((request, consumed))) => {
            assert!(consumed <= data.len());
            let _ = http::query_param(&request.query, "channel");
            match http::upgrade(&request, config()) {
                Ok(upgrade) => {
                    assert!(upgrade.response.starts_with(b"HTTP/1.1 101 "));
                    assert!(upgrade.response.ends_with(b"\r\n\r\n"));
                    if let Some(channel) = &upgrade.channel {
                        fanout::protocol::validate_channel(channel.as_bytes())
                            .expect("an accepted upgrade names a valid channel");
                    }
                }
                Err(response) => assert!((400..500).contains(&response.status)),
            }
        }
        Ok(None) => assert!(data.len() < http::MAX_HEAD_BYTES),
        Err(response) => {
            assert!(matches!(response.status, 400 | 431));
            assert!(response.bytes.starts_with(b"HTTP/1.1 4"));
        }
    }
});
