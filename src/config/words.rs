//! How configuration errors are worded: what a value is, what was expected, and the key a
//! misspelt one probably meant. Shared by the file loader and the namespace tables.

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distances() {
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
    }
}
