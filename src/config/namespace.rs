//! Channel namespaces: who may subscribe to and publish on which channels, and what a channel
//! keeps (history, presence), by channel-name pattern.
//!
//! A namespace is one `[[namespace]]` table of the configuration file. The first namespace whose
//! pattern matches a channel applies to it; a channel no namespace matches, and every channel of
//! a node without namespaces, gets [`Namespace::open`]: anyone subscribes, clients publish, no
//! history, no presence, which is how fanout behaved before namespaces existed.

use std::sync::LazyLock;
use std::time::Duration;

use super::words::{did_you_mean, expected};
use crate::auth::Identity;

/// Who may subscribe to a channel of a namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscribeRule {
    /// Any client, with or without a token.
    Anyone,
    /// A client with a valid token (see Authentication in the README).
    Token,
    /// A client whose token names it the channel's owner: for a pattern `prefix*`, the part
    /// of the channel name after the prefix ([`Namespace::owner_of`]).
    Owner,
}

/// Who may publish on a channel of a namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishRule {
    /// Any connected client, with or without a token.
    Clients,
    /// A client with a valid token.
    Token,
    /// The channel's owner (see [`SubscribeRule::Owner`]).
    Owner,
    /// No WebSocket client: only the server side (Redis, other nodes' backends).
    Server,
}

impl SubscribeRule {
    /// Every rule, as written in the file.
    pub const NAMES: [&'static str; 3] = ["anyone", "token", "owner"];

    pub fn parse(word: &str) -> Option<SubscribeRule> {
        match word {
            "anyone" => Some(SubscribeRule::Anyone),
            "token" => Some(SubscribeRule::Token),
            "owner" => Some(SubscribeRule::Owner),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SubscribeRule::Anyone => "anyone",
            SubscribeRule::Token => "token",
            SubscribeRule::Owner => "owner",
        }
    }
}

impl PublishRule {
    /// Every rule, as written in the file.
    pub const NAMES: [&'static str; 4] = ["clients", "token", "owner", "server"];

    pub fn parse(word: &str) -> Option<PublishRule> {
        match word {
            "clients" => Some(PublishRule::Clients),
            "token" => Some(PublishRule::Token),
            "owner" => Some(PublishRule::Owner),
            "server" => Some(PublishRule::Server),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            PublishRule::Clients => "clients",
            PublishRule::Token => "token",
            PublishRule::Owner => "owner",
            PublishRule::Server => "server",
        }
    }
}

/// The rules for the channels whose names match `pattern`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    /// `*` (every channel), `prefix*` (channels starting with `prefix`) or an exact name.
    pub pattern: String,
    pub subscribe: SubscribeRule,
    pub publish: PublishRule,
    /// Messages a channel keeps for late subscribers; 0: none.
    pub history_size: usize,
    /// How long a kept message stays; zero: no limit by age.
    pub history_ttl: Duration,
    /// Whether the channel tracks who is subscribed.
    pub presence: bool,
}

/// The namespace of channels no configured namespace matches.
static OPEN: LazyLock<Namespace> = LazyLock::new(Namespace::open);

/// The keys a `[[namespace]]` table may have.
pub(super) const KEYS: [&str; 6] = [
    "name",
    "subscribe",
    "publish",
    "history_size",
    "history_ttl",
    "presence",
];

/// A bad `[[namespace]]` table: the key at fault (to locate it) and the message, which names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct TableError {
    pub key: String,
    pub message: String,
}

impl Namespace {
    /// Every channel, open to everyone: what applies where no configured namespace matches.
    pub fn open() -> Namespace {
        Namespace {
            pattern: "*".to_string(),
            subscribe: SubscribeRule::Anyone,
            publish: PublishRule::Clients,
            history_size: 0,
            history_ttl: Duration::ZERO,
            presence: false,
        }
    }

    /// The shared [`Namespace::open`] instance.
    pub fn open_ref() -> &'static Namespace {
        &OPEN
    }

    /// Whether `channel` is one of this namespace's channels.
    pub fn matches(&self, channel: &str) -> bool {
        match self.pattern.strip_suffix('*') {
            Some(prefix) => channel.starts_with(prefix),
            None => channel == self.pattern,
        }
    }

    /// For a `prefix*` pattern that matches `channel`, the rest of the name after the prefix,
    /// without a leading `#`: who the channel belongs to under the `owner` rules (`user:*` makes
    /// user `42` the owner of `user:#42`, and `alice` of `user:alice`). `None` for an exact
    /// pattern, a catch-all `*` or a channel that does not match: such channels have no owner,
    /// so an `owner` rule admits nobody there.
    pub fn owner_of<'a>(&self, channel: &'a str) -> Option<&'a str> {
        let prefix = self.pattern.strip_suffix('*')?;
        if prefix.is_empty() {
            return None;
        }
        let rest = channel.strip_prefix(prefix)?;
        Some(rest.strip_prefix('#').unwrap_or(rest)).filter(|owner| !owner.is_empty())
    }

    /// Whether every channel `later` matches is matched by `self` too, so that `later`, coming
    /// after `self`, could never apply.
    fn covers(&self, later: &Namespace) -> bool {
        match self.pattern.strip_suffix('*') {
            Some(prefix) => later
                .pattern
                .strip_suffix('*')
                .unwrap_or(&later.pattern)
                .starts_with(prefix),
            None => later.pattern == self.pattern,
        }
    }

    /// Builds a namespace from the keys of one `[[namespace]]` table.
    pub(super) fn from_table(table: &toml::Table) -> Result<Namespace, TableError> {
        let err = |key: &str, message: String| TableError {
            key: key.to_string(),
            message: format!("{key}: {message}"),
        };
        for key in table.keys() {
            if !KEYS.contains(&key.as_str()) {
                let hint = did_you_mean(key, KEYS.iter().copied());
                return Err(TableError {
                    key: key.clone(),
                    message: format!("unknown key {key:?}{hint}"),
                });
            }
        }
        let mut ns = Namespace::open();
        ns.pattern = match table.get("name") {
            None => return Err(err("name", "missing: every namespace needs a name".into())),
            Some(toml::Value::String(name)) => {
                check_pattern(name).map_err(|m| err("name", m))?;
                name.clone()
            }
            Some(other) => return Err(err("name", expected("a string", other))),
        };
        if let Some(value) = table.get("subscribe") {
            ns.subscribe = word(value)
                .and_then(|w| {
                    SubscribeRule::parse(w).ok_or_else(|| one_of(w, &SubscribeRule::NAMES))
                })
                .map_err(|m| err("subscribe", m))?;
        }
        if let Some(value) = table.get("publish") {
            ns.publish = word(value)
                .and_then(|w| PublishRule::parse(w).ok_or_else(|| one_of(w, &PublishRule::NAMES)))
                .map_err(|m| err("publish", m))?;
        }
        if let Some(value) = table.get("history_size") {
            ns.history_size = match value {
                toml::Value::Integer(n) => usize::try_from(*n).map_err(|_| {
                    err(
                        "history_size",
                        format!("{n} is not a number of messages >= 0"),
                    )
                })?,
                other => return Err(err("history_size", expected("a whole number", other))),
            };
        }
        if let Some(value) = table.get("history_ttl") {
            let secs = match value {
                toml::Value::Integer(n) => *n as f64,
                toml::Value::Float(f) => *f,
                other => return Err(err("history_ttl", expected("a number of seconds", other))),
            };
            ns.history_ttl = (secs >= 0.0)
                .then(|| Duration::try_from_secs_f64(secs).ok())
                .flatten()
                .ok_or_else(|| {
                    err(
                        "history_ttl",
                        format!("{secs} is not a number of seconds >= 0"),
                    )
                })?;
        }
        if let Some(value) = table.get("presence") {
            ns.presence = match value {
                toml::Value::Boolean(b) => *b,
                other => return Err(err("presence", expected("true or false", other))),
            };
        }
        Ok(ns)
    }
}

/// Checks the namespaces in file order: none may be unreachable behind an earlier one that
/// matches all its channels (a catch-all `*` must come last). The error is (index of the
/// unreachable namespace, why).
pub(super) fn check_order(namespaces: &[Namespace]) -> Result<(), (usize, String)> {
    for (j, later) in namespaces.iter().enumerate() {
        if let Some(i) = namespaces[..j].iter().position(|ns| ns.covers(later)) {
            return Err((
                j,
                format!(
                    "never applies: namespace #{} ({:?}) comes first and matches all its channels",
                    i + 1,
                    namespaces[i].pattern
                ),
            ));
        }
    }
    Ok(())
}

/// The namespace for `channel`: the first of `namespaces` that matches, else the open one.
pub(super) fn find<'a>(namespaces: &'a [Namespace], channel: &str) -> &'a Namespace {
    namespaces
        .iter()
        .find(|ns| ns.matches(channel))
        .unwrap_or_else(|| Namespace::open_ref())
}

/// A pattern is `*`, `prefix*` or an exact channel name; the characters other than a final
/// `*` are those of channel names.
fn check_pattern(pattern: &str) -> Result<(), String> {
    if pattern.is_empty() {
        return Err("must not be empty: give a channel name, `prefix*` or `*`".into());
    }
    let literal = pattern.strip_suffix('*').unwrap_or(pattern);
    if literal.contains('*') {
        return Err(format!(
            "{pattern:?}: a '*' may only end the name (`prefix*`, or `*` alone)"
        ));
    }
    if literal.is_empty() {
        return Ok(());
    }
    crate::protocol::validate_channel(literal.as_bytes()).map_err(|e| format!("{pattern:?}: {e}"))
}

fn word(value: &toml::Value) -> Result<&str, String> {
    value.as_str().ok_or_else(|| expected("a string", value))
}

fn one_of(word: &str, names: &[&str]) -> String {
    format!("{word:?} is not one of {}", names.join(", "))
}

/// The rules, applied to a client when it subscribes and publishes (never per delivery).
impl Namespace {
    /// Whether a client (`who`: its token's identity, if any) may subscribe to `channel`; the
    /// error names the rule, for the JSON error reply (raw mode closes 4003).
    pub fn may_subscribe(&self, who: Option<&Identity>, channel: &str) -> Result<(), String> {
        let allowed = match self.subscribe {
            SubscribeRule::Anyone => true,
            SubscribeRule::Token => {
                who.is_some_and(|i| Identity::allows(i.channels.as_deref(), channel))
            }
            SubscribeRule::Owner => self.owned_by(who, channel),
        };
        self.refusal(allowed, "subscribe", self.subscribe.as_str(), who)
    }

    /// Whether a client may publish to `channel`.
    pub fn may_publish(&self, who: Option<&Identity>, channel: &str) -> Result<(), String> {
        let allowed = match self.publish {
            PublishRule::Clients => true,
            PublishRule::Token => {
                who.is_some_and(|i| Identity::allows(i.publish.as_deref(), channel))
            }
            PublishRule::Owner => self.owned_by(who, channel),
            PublishRule::Server => false,
        };
        self.refusal(allowed, "publish", self.publish.as_str(), who)
    }

    fn owned_by(&self, who: Option<&Identity>, channel: &str) -> bool {
        match (who, self.owner_of(channel)) {
            (Some(i), Some(owner)) => *i.user == *owner,
            _ => false,
        }
    }

    fn refusal(
        &self,
        allowed: bool,
        action: &str,
        rule: &str,
        who: Option<&Identity>,
    ) -> Result<(), String> {
        if allowed {
            return Ok(());
        }
        let why = match (rule, who) {
            ("server", _) => "only the server publishes there".to_string(),
            (_, None) => "a token is required".to_string(),
            ("token", Some(_)) => format!(
                "the token's {} claim does not allow it",
                if action == "subscribe" {
                    "channels"
                } else {
                    "publish"
                }
            ),
            (_, Some(i)) => format!("only the channel's owner may, and user {:?} is not", i.user),
        };
        Err(format!(
            "forbidden: namespace {:?} has {action} = {rule:?}: {why}",
            self.pattern
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> toml::Table {
        text.parse().unwrap()
    }

    fn ns(pattern: &str) -> Namespace {
        Namespace {
            pattern: pattern.into(),
            ..Namespace::open()
        }
    }

    #[test]
    fn patterns_match() {
        assert!(ns("*").matches("anything"));
        assert!(ns("user:*").matches("user:alice"));
        assert!(ns("user:*").matches("user:"));
        assert!(!ns("user:*").matches("users"));
        assert!(ns("lobby").matches("lobby"));
        assert!(!ns("lobby").matches("lobby2"));
        assert_eq!(ns("user:*").owner_of("user:alice"), Some("alice"));
        assert_eq!(ns("user:*").owner_of("user:#42"), Some("42"));
        assert_eq!(ns("user:*").owner_of("user:#"), None);
        assert_eq!(ns("user:*").owner_of("user:"), None);
        assert_eq!(ns("user:*").owner_of("room:1"), None);
        assert_eq!(ns("*").owner_of("alice"), None);
        assert_eq!(ns("lobby").owner_of("lobby"), None);
    }

    #[test]
    fn first_match_wins_and_the_rest_is_open() {
        let list = [
            Namespace {
                publish: PublishRule::Server,
                ..ns("announce:*")
            },
            ns("announce:x"),
        ];
        assert_eq!(find(&list, "announce:x").publish, PublishRule::Server);
        assert_eq!(find(&list, "other"), &Namespace::open());
        assert_eq!(find(&[], "other"), &Namespace::open());
    }

    #[test]
    fn a_table_with_every_key() {
        let got = Namespace::from_table(&table(
            r#"name = "room:*"
               subscribe = "token"
               publish = "owner"
               history_size = 50
               history_ttl = 1.5
               presence = true"#,
        ))
        .unwrap();
        assert_eq!(
            got,
            Namespace {
                pattern: "room:*".into(),
                subscribe: SubscribeRule::Token,
                publish: PublishRule::Owner,
                history_size: 50,
                history_ttl: Duration::from_millis(1500),
                presence: true,
            }
        );
        let defaults = Namespace::from_table(&table(r#"name = "lobby""#)).unwrap();
        assert_eq!(defaults, ns("lobby"));
    }

    #[test]
    fn bad_tables_name_the_key() {
        for (text, key, needle) in [
            (r#"subscribe = "anyone""#, "name", "missing"),
            (r#"name = """#, "name", "empty"),
            (r#"name = "a*b""#, "name", "may only end"),
            (r#"name = "sp ace""#, "name", "contains"),
            (r#"name = 5"#, "name", "not an integer 5"),
            (
                r#"name = "a"
                subscribe = "everyone""#,
                "subscribe",
                "\"everyone\" is not one of anyone, token, owner",
            ),
            (
                r#"name = "a"
                publish = "anyone""#,
                "publish",
                "is not one of clients, token, owner, server",
            ),
            (
                r#"name = "a"
                publish = true"#,
                "publish",
                "expected a string",
            ),
            (
                r#"name = "a"
                history_size = -1"#,
                "history_size",
                ">= 0",
            ),
            (
                r#"name = "a"
                history_size = 1.5"#,
                "history_size",
                "whole number",
            ),
            (
                r#"name = "a"
                history_ttl = -2"#,
                "history_ttl",
                ">= 0",
            ),
            (
                r#"name = "a"
                history_ttl = "1m""#,
                "history_ttl",
                "seconds",
            ),
            (
                r#"name = "a"
                presence = "yes""#,
                "presence",
                "true or false",
            ),
            (
                r#"name = "a"
                presense = true"#,
                "presense",
                "unknown key \"presense\" (did you mean \"presence\"?)",
            ),
        ] {
            let e = Namespace::from_table(&table(text)).unwrap_err();
            assert_eq!(e.key, key, "{text}: {e:?}");
            assert!(e.message.contains(needle), "{text}: {e:?}");
            if !needle.starts_with("unknown") {
                assert!(e.message.starts_with(&format!("{key}: ")), "{e:?}");
            }
        }
    }

    #[test]
    fn unreachable_namespaces_are_refused() {
        assert!(check_order(&[ns("user:*"), ns("room:*"), ns("lobby"), ns("*")]).is_ok());
        for (list, at) in [
            (vec![ns("*"), ns("user:*")], 1),
            (vec![ns("user:*"), ns("room:1"), ns("user:admin:*")], 2),
            (vec![ns("lobby"), ns("lobby")], 1),
            (vec![ns("u*"), ns("user:x")], 1),
        ] {
            let (i, message) = check_order(&list).unwrap_err();
            assert_eq!(i, at, "{list:?}");
            assert!(message.contains("never applies"), "{message}");
        }
        // An exact name before a prefix that includes it is fine: the prefix still applies
        // to the other channels.
        assert!(check_order(&[ns("user:admin"), ns("user:*")]).is_ok());
    }
}
