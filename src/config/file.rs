//! The configuration file: `--config PATH` (`FANOUT_CONFIG`), in TOML.
//!
//! Every option of [`Args`] can be set in the file under its flag's name in snake_case
//! (`--max-message` is `max_message`). The options are found by walking clap's own list of
//! arguments, so an option added to `Args` later is settable in the file with no code here.
//!
//! Precedence is flag > environment > file > default, and clap decides it: the command line is
//! parsed once to learn where each option's value came from ([`ArgMatches::value_source`]);
//! every file key whose option came from neither the command line nor the environment becomes
//! `--flag=value` arguments, and the command line is parsed again with those in front of the
//! real arguments. So a value from the file goes through the same parser and the same
//! [`Config::from_args`] checks as a flag, and an error about it is reported with the file, the
//! line and the key instead of the flag.
//!
//! Values: a string is used as written; an integer or a float as its decimal text (durations are
//! seconds); a boolean gives a switch (true) or not (false), or becomes on/off (true/false) for
//! an option whose possible values are those; an array gives a repeatable option once per item (or joins
//! the items with the option's value delimiter). Not settable: hidden options (test-only fault
//! injection), and `config` itself. The one key that is not an option is `namespace`, an array of
//! `[[namespace]]` tables ([`super::namespace`]).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, Command, CommandFactory, FromArgMatches};
use serde::Deserialize;
use toml::Spanned;

use super::namespace::{self, Namespace};
use super::{Args, Config};

/// The key of the `[[namespace]]` tables, the one key that is not an option.
const NAMESPACE_KEY: &str = "namespace";

/// Why the configuration could not be loaded. Either way the process should stop before it
/// opens any socket: [`LoadError::exit`].
#[derive(Debug)]
pub enum LoadError {
    /// From clap: a bad or unknown flag, or `--help` / `--version`, which clap prints itself.
    Clap(clap::Error),
    /// A bad value or a bad configuration file, as one line to print after `fanout: `.
    Invalid(String),
}

impl LoadError {
    /// Prints the error (or the help) and exits: status 2 for errors, like any bad flag, and 0
    /// for `--help` and `--version`.
    pub fn exit(self) -> ! {
        match self {
            LoadError::Clap(e) => e.exit(),
            LoadError::Invalid(message) => {
                eprintln!("fanout: {message}");
                std::process::exit(2);
            }
        }
    }
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadError::Clap(e) => write!(f, "{}", e.render()),
            LoadError::Invalid(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for LoadError {}

/// A TOML table with the position of every key and value.
type SpannedTable = BTreeMap<Spanned<String>, Spanned<toml::Value>>;

/// Only the `[[namespace]]` tables of the file, each with its position.
#[derive(Deserialize)]
struct NamespaceTables {
    #[serde(default)]
    namespace: Vec<Spanned<SpannedTable>>,
}

/// An option whose value the file supplies (no flag or environment variable overrides it).
#[derive(Debug)]
struct Supplied {
    long: String,
    key: String,
    line: usize,
}

/// What a configuration file adds to the command line.
#[derive(Debug)]
struct FromFile {
    path: PathBuf,
    /// The path as given, for messages.
    shown: String,
    /// `--flag=value` arguments to parse before the real ones.
    args: Vec<OsString>,
    supplied: Vec<Supplied>,
    namespaces: Vec<Namespace>,
}

/// Parses `argv` (the program name first), reads the configuration file if `--config` or
/// `FANOUT_CONFIG` names one, and validates the result.
pub(super) fn load<I, T>(argv: I) -> Result<Config, LoadError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString>,
{
    let argv: Vec<OsString> = argv.into_iter().map(Into::into).collect();
    let (matches, file) = parse(&Args::command(), &argv)?;
    let mut config = from_matches(&matches, file.as_ref())?;
    if let Some(file) = file {
        config.namespaces = file.namespaces;
        config.config_file = Some(file.path);
    }
    Ok(config)
}

/// The generic part, for any command with a `config` argument: the matches of `argv` with the
/// file's options in, and what the file held.
fn parse(cmd: &Command, argv: &[OsString]) -> Result<(ArgMatches, Option<FromFile>), LoadError> {
    // The first parse only learns where values come from, and the file's path: an option the
    // file may supply must not be required yet. The second parse checks everything.
    let first = cmd
        .clone()
        .mut_args(|arg| arg.required(false))
        .try_get_matches_from(argv)
        .map_err(LoadError::Clap)?;
    let file = match first.get_one::<PathBuf>("config") {
        Some(path) => Some(FromFile::read(path, cmd, &first)?),
        None => None,
    };
    let (program, rest) = match argv.split_first() {
        Some((program, rest)) => (program.clone(), rest),
        None => (OsString::from("fanout"), &[][..]),
    };
    let second: Vec<OsString> = std::iter::once(program)
        .chain(file.iter().flat_map(|file| file.args.iter().cloned()))
        .chain(rest.iter().cloned())
        .collect();
    let matches = cmd
        .clone()
        .try_get_matches_from(second)
        .map_err(|e| match &file {
            Some(file) => file.clap_error(e),
            None => LoadError::Clap(e),
        })?;
    Ok((matches, file))
}

fn from_matches(matches: &ArgMatches, file: Option<&FromFile>) -> Result<Config, LoadError> {
    let args = Args::from_arg_matches(matches).map_err(LoadError::Clap)?;
    Config::from_args(args).map_err(|e| {
        let message = format!("{e:#}");
        match file.and_then(|file| file.claim(&message)) {
            Some(message) => LoadError::Invalid(message),
            None => LoadError::Invalid(format!("bad configuration: {message}")),
        }
    })
}

impl FromFile {
    /// Reads and checks the file; `matches` (the command line and environment alone) says
    /// which options the file may still supply.
    fn read(path: &Path, cmd: &Command, matches: &ArgMatches) -> Result<FromFile, LoadError> {
        let shown = path.display().to_string();
        let fail = |message: String| LoadError::Invalid(format!("{shown}: {message}"));
        let text = std::fs::read_to_string(path).map_err(|e| fail(format!("cannot read: {e}")))?;
        let lines = Lines::new(&text);
        let top: SpannedTable = toml::from_str(&text).map_err(|e| {
            let at = e.span().map(|s| format!("line {}: ", lines.of(s.start)));
            fail(format!(
                "{}not valid TOML: {}",
                at.unwrap_or_default(),
                e.message().trim_end()
            ))
        })?;
        let options = settable(cmd);
        let mut file = FromFile {
            path: path.to_path_buf(),
            shown: shown.clone(),
            args: Vec::new(),
            supplied: Vec::new(),
            namespaces: Vec::new(),
        };
        // In file order, so the first mistake reported is the topmost one.
        let mut entries: Vec<_> = top.iter().collect();
        entries.sort_by_key(|(key, _)| key.span().start);
        for (key, value) in entries {
            let line = lines.of(key.span().start);
            let name = key.get_ref().as_str();
            let at = |message: String| fail(format!("line {line}: {message}"));
            if name == NAMESPACE_KEY {
                file.namespaces = namespaces(&text, &lines, line, value.get_ref())
                    .map_err(|(line, m)| fail(format!("line {line}: {m}")))?;
                continue;
            }
            if name == "config" {
                return Err(at(
                    "config: a configuration file cannot name another; use --config or FANOUT_CONFIG"
                        .into(),
                ));
            }
            let Some(arg) = options.get(name) else {
                let candidates = options.keys().map(String::as_str).chain([NAMESPACE_KEY]);
                let hint = did_you_mean(name, candidates);
                return Err(at(format!("unknown key {name:?}{hint}")));
            };
            let flags = to_flags(arg, value.get_ref()).map_err(|m| at(format!("{name}: {m}")))?;
            let overridden = matches!(
                matches.value_source(arg.get_id().as_str()),
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            );
            if !overridden {
                file.args.extend(flags);
                file.supplied.push(Supplied {
                    long: arg.get_long().unwrap_or_default().to_string(),
                    key: name.to_string(),
                    line,
                });
            }
        }
        Ok(file)
    }

    /// A [`Config::from_args`] message that starts with a flag the file supplied, rewritten to
    /// name the file, the line and the key instead.
    fn claim(&self, message: &str) -> Option<String> {
        self.supplied.iter().find_map(|s| {
            let rest = message.strip_prefix(&format!("--{}:", s.long))?;
            Some(format!("{}: line {}: {}:{rest}", self.shown, s.line, s.key))
        })
    }

    /// The second parse failed: the command line and environment alone parsed, so a value from
    /// the file is at fault (a value its option's parser refuses, a conflict with a flag).
    fn clap_error(&self, e: clap::Error) -> LoadError {
        // The message is the first paragraph (clap adds the usage and a hint after a blank
        // line), made one line: `invalid value 'x' for '--flag <V>' [possible values: a, b]`.
        let rendered = e.render().to_string();
        let paragraph: Vec<&str> = rendered
            .lines()
            .map(str::trim)
            .take_while(|line| !line.is_empty())
            .collect();
        let text = paragraph.join(" ");
        let text = text.strip_prefix("error: ").unwrap_or(&text);
        let culprit = self
            .supplied
            .iter()
            .filter_map(|s| mentions(text, &s.long).map(|at| (at, s)))
            .min_by_key(|(at, _)| *at);
        match culprit {
            Some((_, s)) => LoadError::Invalid(format!(
                "{}: line {}: {}: {text}",
                self.shown, s.line, s.key
            )),
            None => LoadError::Clap(e),
        }
    }
}

/// The options a file may set, by key: every argument with a long flag that is not hidden and
/// is not `--config`, `--help` or `--version`.
fn settable(cmd: &Command) -> BTreeMap<String, &Arg> {
    cmd.get_arguments()
        .filter(|arg| !arg.is_hide_set() && arg.get_id() != "config")
        .filter(|arg| {
            !matches!(
                arg.get_action(),
                ArgAction::Help | ArgAction::HelpShort | ArgAction::HelpLong | ArgAction::Version
            )
        })
        .filter_map(|arg| Some((arg.get_long()?.replace('-', "_"), arg)))
        .collect()
}

/// The `--flag=value` arguments that give `arg` the file's `value`.
fn to_flags(arg: &Arg, value: &toml::Value) -> Result<Vec<OsString>, String> {
    let long = arg.get_long().unwrap_or_default();
    let flag = |text: String| OsString::from(format!("--{long}={text}"));
    match arg.get_action() {
        ArgAction::SetTrue | ArgAction::SetFalse => match value {
            // The key is the flag's name, so true gives the flag, whatever it sets.
            toml::Value::Boolean(given) => Ok(if *given {
                vec![OsString::from(format!("--{long}"))]
            } else {
                Vec::new()
            }),
            other => Err(expected("true or false", other)),
        },
        ArgAction::Count => match value {
            toml::Value::Integer(n) if (0..=255).contains(n) => {
                Ok(vec![OsString::from(format!("--{long}")); *n as usize])
            }
            other => Err(expected("a count from 0 to 255", other)),
        },
        ArgAction::Append => match value {
            toml::Value::Array(items) => items
                .iter()
                .map(|item| scalar(arg, item).map(flag))
                .collect(),
            other => Ok(vec![flag(scalar(arg, other)?)]),
        },
        _ => match (value, arg.get_value_delimiter()) {
            (toml::Value::Array(items), Some(delimiter)) => {
                let items: Result<Vec<String>, String> =
                    items.iter().map(|item| scalar(arg, item)).collect();
                Ok(vec![flag(items?.join(&delimiter.to_string()))])
            }
            (toml::Value::Array(_), None) => Err("takes one value, not an array".to_string()),
            (other, _) => Ok(vec![flag(scalar(arg, other)?)]),
        },
    }
}

/// One value of an option, as its flag would take it.
fn scalar(arg: &Arg, value: &toml::Value) -> Result<String, String> {
    match value {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(n) => Ok(n.to_string()),
        toml::Value::Float(x) => Ok(x.to_string()),
        toml::Value::Boolean(on) => {
            let names: Vec<String> = arg
                .get_possible_values()
                .iter()
                .map(|v| v.get_name().to_string())
                .collect();
            [("on", "off"), ("true", "false"), ("yes", "no")]
                .into_iter()
                .find(|(yes, no)| names.iter().any(|n| n == yes) && names.iter().any(|n| n == no))
                .map(|(yes, no)| if *on { yes } else { no }.to_string())
                .ok_or_else(|| expected("a string or a number", value))
        }
        other => Err(expected("a string, a number or a boolean", other)),
    }
}

/// The `[[namespace]]` tables (`value`, whose key is on line `key_line`), checked; an error is
/// (line, message).
fn namespaces(
    text: &str,
    lines: &Lines,
    key_line: usize,
    value: &toml::Value,
) -> Result<Vec<Namespace>, (usize, String)> {
    let tables =
        matches!(value, toml::Value::Array(items) if items.iter().all(toml::Value::is_table));
    if !tables {
        let m = format!(
            "{NAMESPACE_KEY}: expected [[{NAMESPACE_KEY}]] tables, not {}",
            describe(value)
        );
        return Err((key_line, m));
    }
    let tables: NamespaceTables = toml::from_str(text).map_err(|e| {
        let line = e.span().map_or(key_line, |s| lines.of(s.start));
        (line, format!("{NAMESPACE_KEY}: {}", e.message().trim_end()))
    })?;
    let mut list = Vec::with_capacity(tables.namespace.len());
    let mut name_lines = Vec::with_capacity(tables.namespace.len());
    for (i, table) in tables.namespace.iter().enumerate() {
        let table_line = lines.of(table.span().start);
        let line_of = |key: &str| {
            table
                .get_ref()
                .keys()
                .find(|k| k.get_ref() == key)
                .map_or(table_line, |k| lines.of(k.span().start))
        };
        let plain: toml::Table = table
            .get_ref()
            .iter()
            .map(|(k, v)| (k.get_ref().clone(), v.get_ref().clone()))
            .collect();
        let ns = Namespace::from_table(&plain).map_err(|e| {
            (
                line_of(&e.key),
                format!("namespace #{}: {}", i + 1, e.message),
            )
        })?;
        name_lines.push(line_of("name"));
        list.push(ns);
    }
    namespace::check_order(&list)
        .map_err(|(j, m)| (name_lines[j], format!("namespace #{}: {m}", j + 1)))?;
    Ok(list)
}

/// Where `--long` appears in `text` as a whole flag (not the start of a longer one).
fn mentions(text: &str, long: &str) -> Option<usize> {
    let needle = format!("--{long}");
    text.match_indices(&needle).map(|(at, _)| at).find(|&at| {
        !text[at + needle.len()..]
            .starts_with(|c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    })
}

/// ` (did you mean "x"?)` for the candidate closest to a misspelt key, or nothing.
pub(super) fn did_you_mean<'a>(key: &str, candidates: impl Iterator<Item = &'a str>) -> String {
    let normal = key.to_ascii_lowercase().replace('-', "_");
    let limit = (key.len() / 3).max(1);
    candidates
        .map(|c| (edit_distance(&normal, c), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| format!(" (did you mean {c:?}?)"))
        .unwrap_or_default()
}

/// Levenshtein distance, by characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let next = (diagonal + usize::from(ca != cb))
                .min(row[j] + 1)
                .min(row[j + 1] + 1);
            diagonal = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

pub(super) fn expected(what: &str, got: &toml::Value) -> String {
    format!("expected {what}, not {}", describe(got))
}

/// `a string "x"`, `an integer 5`, `an array`, `a table`: what a value is, for messages.
pub(super) fn describe(value: &toml::Value) -> String {
    match value {
        toml::Value::String(s) => format!("a string {s:?}"),
        toml::Value::Integer(n) => format!("an integer {n}"),
        toml::Value::Float(x) => format!("a float {x}"),
        toml::Value::Boolean(b) => format!("a boolean {b}"),
        toml::Value::Datetime(d) => format!("a datetime {d}"),
        toml::Value::Array(_) => "an array".into(),
        toml::Value::Table(_) => "a table".into(),
    }
}

/// Byte offset to line number.
struct Lines {
    starts: Vec<usize>,
}

impl Lines {
    fn new(text: &str) -> Lines {
        let starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Lines { starts }
    }

    /// The 1-based line of byte `offset`.
    fn of(&self, offset: usize) -> usize {
        self.starts.partition_point(|&start| start <= offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{PublishRule, SubscribeRule};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    /// Writes `text` to a new file in the temporary directory; removed when dropped.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(text: &str) -> TempFile {
            static N: AtomicUsize = AtomicUsize::new(0);
            let path = std::env::temp_dir().join(format!(
                "fanout-config-unit-{}-{}.toml",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::write(&path, text).unwrap();
            TempFile(path)
        }

        fn path(&self) -> &str {
            self.0.to_str().unwrap()
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// `fanout --threads 1 --config FILE FLAGS...` with `text` as the file.
    fn load_file(text: &str, flags: &[&str]) -> (TempFile, Result<Config, LoadError>) {
        let file = TempFile::new(text);
        let mut argv = vec!["fanout", "--threads", "1", "--config", file.path()];
        argv.extend_from_slice(flags);
        let result = load(argv);
        (file, result)
    }

    fn error(text: &str, flags: &[&str]) -> (String, String) {
        let (file, result) = load_file(text, flags);
        match result {
            Err(LoadError::Invalid(message)) => (file.path().to_string(), message),
            Err(LoadError::Clap(e)) => panic!("a clap error for {text:?}: {e}"),
            Ok(_) => panic!("{text:?} accepted"),
        }
    }

    #[test]
    fn file_values_are_used_and_flags_win() {
        let text = r#"
            listen = "127.0.0.1:0"
            max_message = 1000
            ping_interval = 0.5
            compression = true
            allowed_origins = ["https://a", "https://b/"]
            log_level = "warn"
        "#;
        let (file, config) = load_file(text, &[]);
        let config = config.unwrap();
        assert_eq!(config.max_message, 1000);
        assert_eq!(config.ping_interval, Duration::from_millis(500));
        assert!(config.compression);
        assert_eq!(config.allowed_origins, ["https://a", "https://b"]);
        assert_eq!(config.log_level, log::LevelFilter::Warn);
        assert_eq!(config.config_file.as_deref(), Some(file.0.as_path()));
        assert_eq!(config.threads, 1, "a flag the file does not set");
        assert_eq!(
            config.max_queue,
            1 << 20,
            "an option neither sets: its default"
        );
        let (_, config) = load_file(text, &["--max-message", "2000", "--compression=off"]);
        let config = config.unwrap();
        assert_eq!((config.max_message, config.compression), (2000, false));
        assert_eq!(config.ping_interval, Duration::from_millis(500));
    }

    #[test]
    fn without_a_file_the_flags_alone_count() {
        let config = load(["fanout", "--threads", "1", "--max-message", "999"]).unwrap();
        assert_eq!((config.max_message, &config.config_file), (999, &None));
        assert!(config.namespaces.is_empty());
        assert_eq!(config.namespace_for("anything"), &Namespace::open());
        match load(["fanout", "--threads", "1", "--max-message", "abc"]) {
            Err(LoadError::Invalid(m)) => {
                assert_eq!(
                    m,
                    "bad configuration: --max-message: \"abc\" is not a whole number"
                )
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            load(["fanout", "--no-such-flag"]),
            Err(LoadError::Clap(_))
        ));
    }

    #[test]
    fn errors_name_the_file_the_line_and_the_key() {
        let (path, m) = error("listen = \"127.0.0.1:0\"\nmax_mesage = 5\n", &[]);
        assert_eq!(
            m,
            format!("{path}: line 2: unknown key \"max_mesage\" (did you mean \"max_message\"?)")
        );
        let (path, m) = error("\n\nmax_message = \"abc\"", &[]);
        assert_eq!(
            m,
            format!("{path}: line 3: max_message: \"abc\" is not a whole number")
        );
        let (path, m) = error("max_message = [1]", &[]);
        assert_eq!(
            m,
            format!("{path}: line 1: max_message: takes one value, not an array")
        );
        let (path, m) = error("max_subscriptions = 0", &[]);
        assert_eq!(
            m,
            format!("{path}: line 1: max_subscriptions: 0 is outside 1..=65536")
        );
        // --threads 1 is on the command line: the file's threads is never looked at.
        let (_, m) = error("threads = \"many\"\nlisten = \"x\"", &[]);
        assert!(m.contains("line 2: listen: \"x\" is not an IP:PORT"), "{m}");
        let (path, m) = error("fault_panic_reactor = 0", &[]);
        assert_eq!(
            m,
            format!("{path}: line 1: unknown key \"fault_panic_reactor\"")
        );
        let (_, m) = error("compression = \"maybe\"", &[]);
        assert!(m.contains("compression: invalid value 'maybe'"), "{m}");
        assert!(m.contains("[possible values: on, off]"), "{m}");
        let (_, m) = error(
            "redis = \"redis://a:1\"",
            &["--redis-cluster", "redis://b:2"],
        );
        assert!(
            m.contains("line 1: redis: the argument '--redis <REDIS>' cannot be used"),
            "{m}"
        );
        let (_, m) = error("max_queue = 2000", &["--max-message", "4000"]);
        assert!(
            m.contains("line 1: max_queue: 2000 is smaller than --max-message 4000"),
            "{m}"
        );
        let (path, m) = error("a = 1\nb = \n", &[]);
        assert!(
            m.starts_with(&format!("{path}: line 2: not valid TOML: ")),
            "{m}"
        );
        let (path, m) = error("a = 1\na = 2\n", &[]);
        assert!(
            m.starts_with(&format!("{path}: line 2: not valid TOML: ")),
            "{m}"
        );
        let (_, m) = error("config = \"other.toml\"", &[]);
        assert!(
            m.contains("line 1: config: a configuration file cannot name another"),
            "{m}"
        );
        match load(["fanout", "--config", "/nonexistent/fanout.toml"]) {
            Err(LoadError::Invalid(m)) => assert!(
                m.starts_with("/nonexistent/fanout.toml: cannot read: "),
                "{m}"
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn namespaces_come_from_the_tables() {
        let text = r#"
            [[namespace]]
            name = "user:*"
            subscribe = "owner"
            publish = "owner"

            [[namespace]]
            name = "announce:*"
            publish = "server"
            history_size = 10
            history_ttl = 60
            presence = true
        "#;
        let (_, config) = load_file(text, &[]);
        let config = config.unwrap();
        assert_eq!(config.namespaces.len(), 2);
        let user = config.namespace_for("user:alice");
        assert_eq!(
            (user.subscribe, user.publish),
            (SubscribeRule::Owner, PublishRule::Owner)
        );
        let announce = config.namespace_for("announce:all");
        assert_eq!(announce.publish, PublishRule::Server);
        assert_eq!(announce.history_size, 10);
        assert_eq!(announce.history_ttl, Duration::from_secs(60));
        assert!(announce.presence);
        assert_eq!(config.namespace_for("lobby"), &Namespace::open());

        let bad =
            "[[namespace]]\nname = \"a:*\"\n\n[[namespace]]\nname = \"b\"\nsubscribe = \"all\"\n";
        let (path, m) = error(bad, &[]);
        assert_eq!(
            m,
            format!("{path}: line 6: namespace #2: subscribe: \"all\" is not one of anyone, token, owner")
        );
        let (_, m) = error("[[namespace]]\nname = \"b\"\nhistory = 5\n", &[]);
        assert!(
            m.contains("line 3: namespace #1: unknown key \"history\""),
            "{m}"
        );
        let (_, m) = error("[[namespace]]\nname = \"\"\n", &[]);
        assert!(
            m.contains("line 2: namespace #1: name: must not be empty"),
            "{m}"
        );
        let (_, m) = error("[[namespace]]\npublish = \"server\"\n", &[]);
        assert!(m.contains("line 1: namespace #1: name: missing"), "{m}");
        let (_, m) = error("[namespace]\nname = \"b\"\n", &[]);
        assert!(
            m.contains("line 1: namespace: expected [[namespace]] tables, not a table"),
            "{m}"
        );
        let (_, m) = error(
            "[[namespace]]\nname = \"*\"\n[[namespace]]\nname = \"x\"\n",
            &[],
        );
        assert!(m.contains("line 4: namespace #2: never applies"), "{m}");
    }

    /// An option added to `Args` later is settable with no code for it: the file is read
    /// against whatever arguments the command has.
    #[test]
    fn an_option_added_later_needs_no_code() {
        let cmd = Args::command()
            .arg(Arg::new("token_audience").long("token-audience"))
            .arg(Arg::new("token_issuer").long("token-issuer"));
        let file =
            TempFile::new("token_audience = \"chat\"\ntoken_issuer = \"me\"\nmax_message = 100\n");
        let matches = cmd
            .clone()
            .try_get_matches_from(["fanout", "--token-issuer", "flag", "--config", file.path()])
            .unwrap();
        let from_file = FromFile::read(&file.0, &cmd, &matches).unwrap();
        let args: Vec<_> = from_file.args.iter().map(|a| a.to_str().unwrap()).collect();
        assert_eq!(
            args,
            ["--token-audience=chat", "--max-message=100"],
            "the file's token_issuer is overridden by the flag"
        );
    }

    #[test]
    fn misspelt_keys_get_a_suggestion() {
        let keys = ["max_message", "max_queue", "namespace", "log_level"];
        let hint = |k: &str| did_you_mean(k, keys.iter().copied());
        assert_eq!(hint("max_mesage"), " (did you mean \"max_message\"?)");
        assert_eq!(hint("max-message"), " (did you mean \"max_message\"?)");
        assert_eq!(hint("MAX_QUEUE"), " (did you mean \"max_queue\"?)");
        assert_eq!(hint("namespaces"), " (did you mean \"namespace\"?)");
        assert_eq!(hint("colour"), "");
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
    }

    #[test]
    fn lines_and_flag_mentions() {
        let lines = Lines::new("a\nbc\n\nd");
        assert_eq!([0, 1, 2, 4, 5, 6].map(|o| lines.of(o)), [1, 1, 2, 2, 3, 4]);
        let text = "the argument '--redis <REDIS>' cannot be used with '--redis-cluster <X>'";
        assert_eq!(mentions(text, "redis"), Some(14));
        assert_eq!(mentions(text, "redis-cluster"), Some(52));
        assert_eq!(mentions("'--max-message-rate <N>'", "max-message"), None);
    }

    /// Every option of `Args` but the hidden one is settable, under its snake_case name.
    #[test]
    fn every_visible_option_is_settable() {
        let cmd = Args::command();
        let keys: Vec<String> = settable(&cmd).into_keys().collect();
        for arg in cmd.get_arguments() {
            let key = arg.get_long().unwrap().replace('-', "_");
            let expect = !arg.is_hide_set() && key != "config";
            assert_eq!(keys.contains(&key), expect, "{key}");
        }
        assert!(keys.contains(&"max_message".to_string()));
        assert!(!keys.contains(&"fault_panic_reactor".to_string()));
    }

    #[test]
    fn values_become_flags() {
        let cmd = Args::command();
        let options = settable(&cmd);
        let flags = |key: &str, toml_value: &str| {
            let table: toml::Table = format!("v = {toml_value}").parse().unwrap();
            let value = &table["v"];
            to_flags(options[key], value).map(|v| {
                v.into_iter()
                    .map(|f| f.into_string().unwrap())
                    .collect::<Vec<_>>()
            })
        };
        assert_eq!(
            flags("max_message", "1024"),
            Ok(vec!["--max-message=1024".into()])
        );
        assert_eq!(
            flags("ping_interval", "0.5"),
            Ok(vec!["--ping-interval=0.5".into()])
        );
        assert_eq!(
            flags("listen", "\"[::1]:80\""),
            Ok(vec!["--listen=[::1]:80".into()])
        );
        assert_eq!(
            flags("compression", "true"),
            Ok(vec!["--compression=on".into()])
        );
        assert_eq!(
            flags("compression", "false"),
            Ok(vec!["--compression=off".into()])
        );
        assert_eq!(
            flags("allowed_origins", r#"["https://a", "https://b"]"#),
            Ok(vec![
                "--allowed-origins=https://a".into(),
                "--allowed-origins=https://b".into()
            ])
        );
        assert_eq!(
            flags("allowed_origins", r#""https://a,https://b""#),
            Ok(vec!["--allowed-origins=https://a,https://b".into()])
        );
        assert!(flags("max_message", "[1, 2]")
            .unwrap_err()
            .contains("not an array"));
        assert!(flags("max_message", "true")
            .unwrap_err()
            .contains("not a boolean true"));
        assert!(flags("max_message", "1979-05-27")
            .unwrap_err()
            .contains("datetime"));
        assert!(flags("allowed_origins", "[[1]]")
            .unwrap_err()
            .contains("not an array"));
    }

    #[test]
    fn switches_and_counts_follow_their_action() {
        let cmd = Command::new("t")
            .arg(Arg::new("quiet").long("quiet").action(ArgAction::SetTrue))
            .arg(
                Arg::new("color")
                    .long("no-color")
                    .action(ArgAction::SetFalse),
            )
            .arg(Arg::new("verbose").long("verbose").action(ArgAction::Count));
        let options = settable(&cmd);
        let strings = |v: Vec<OsString>| -> Vec<String> {
            v.into_iter().map(|f| f.into_string().unwrap()).collect()
        };
        let quiet = options["quiet"];
        let verbose = options["verbose"];
        assert_eq!(
            strings(to_flags(quiet, &toml::Value::Boolean(true)).unwrap()),
            ["--quiet"]
        );
        assert!(to_flags(quiet, &toml::Value::Boolean(false))
            .unwrap()
            .is_empty());
        assert!(to_flags(quiet, &toml::Value::Integer(1)).is_err());
        assert_eq!(
            strings(to_flags(options["no_color"], &toml::Value::Boolean(true)).unwrap()),
            ["--no-color"]
        );
        assert_eq!(
            strings(to_flags(verbose, &toml::Value::Integer(2)).unwrap()),
            ["--verbose", "--verbose"]
        );
    }

    /// A required option may come from the file: only the second parse requires it.
    #[test]
    fn a_required_option_may_come_from_the_file() {
        let cmd = Command::new("t")
            .arg(
                Arg::new("config")
                    .long("config")
                    .value_parser(clap::value_parser!(PathBuf)),
            )
            .arg(Arg::new("secret_file").long("secret-file").required(true));
        let file = TempFile::new("secret_file = \"/run/secret\"\n");
        let argv = |extra: &[&str]| -> Vec<OsString> {
            ["t"].iter().chain(extra).map(OsString::from).collect()
        };
        let (matches, _) = parse(&cmd, &argv(&["--config", file.path()])).unwrap();
        assert_eq!(
            matches.get_one::<String>("secret_file").map(String::as_str),
            Some("/run/secret")
        );
        let (matches, _) = parse(
            &cmd,
            &argv(&["--config", file.path(), "--secret-file", "/flag"]),
        )
        .unwrap();
        assert_eq!(
            matches.get_one::<String>("secret_file").map(String::as_str),
            Some("/flag")
        );
        match parse(&cmd, &argv(&[])) {
            Err(LoadError::Clap(e)) => {
                assert_eq!(e.kind(), clap::error::ErrorKind::MissingRequiredArgument)
            }
            other => panic!("{other:?}"),
        }
    }
}
