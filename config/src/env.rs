//! `${env:NAME}` references in the configuration file, the OpenTelemetry Collector's syntax, so
//! credentials and per-host values can come from the service's environment (systemd
//! `Environment=` / `EnvironmentFile=`) instead of the file:
//!
//! - `${env:NAME}` is the variable's value; `${env:NAME:-default}` the default when it is unset;
//!   an unset variable without a default is a problem (the Collector substitutes an empty
//!   string; a silently empty password or endpoint is worse than a refusal to start);
//! - `$$` is a literal `$`; any other `${...}` is a problem (only `env:` is a source here);
//! - lines that are only a comment are left alone.
//!
//! Expansion is textual but respects where the reference stands: inside a double-quoted scalar
//! the value is escaped for it, inside a single-quoted one its quotes are doubled; in a plain
//! scalar a value that YAML would read as structure (`: `, ` #`, a newline, flow indicators,
//! a leading indicator) is refused with the advice to quote the reference. A value can thus
//! never change the shape of the file. The values are remembered so that error messages can be
//! redacted: a parse error quoting a line shows the reference, never a secret.

/// The configuration text with every reference expanded.
#[derive(Debug)]
pub(crate) struct Expanded {
    pub text: String,
    /// (value, reference) of every expansion with a non-empty value, for redaction.
    pub values: Vec<(String, String)>,
}

impl Expanded {
    /// `message` with every expanded value replaced by the reference that produced it.
    pub fn redact(&self, message: &str) -> String {
        let mut out = message.to_owned();
        // Longest values first, so a value containing another is replaced whole.
        let mut values: Vec<&(String, String)> = self.values.iter().collect();
        values.sort_by_key(|(value, _)| std::cmp::Reverse(value.len()));
        for (value, reference) in values {
            out = out.replace(value.as_str(), reference);
        }
        out
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Quoting {
    Plain,
    Single,
    Double,
}

/// Expands `text` with `lookup` for the variables; every problem is listed (line numbers are
/// 1-based).
pub(crate) fn expand(text: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<Expanded, Vec<String>> {
    let mut out = String::with_capacity(text.len());
    let mut values = Vec::new();
    let mut problems = Vec::new();
    for (index, line) in text.split_inclusive('\n').enumerate() {
        if line.trim_start().starts_with('#') || !line.contains('$') {
            out.push_str(line);
            continue;
        }
        let mut quoting = Quoting::Plain;
        let mut rest = line;
        while let Some(c) = rest.chars().next() {
            if c == '$' && rest.starts_with("$$") {
                out.push('$');
                rest = &rest[2..];
                continue;
            }
            if c == '$' && rest.starts_with("${") {
                let Some(end) = rest.find('}') else {
                    problems.push(format!(
                        "line {}: `${{` without a closing `}}` (write `$${{` for a literal `${{`)",
                        index + 1
                    ));
                    out.push_str(rest);
                    break;
                };
                let reference = &rest[..=end];
                match resolve(&reference[2..end], lookup) {
                    Err(problem) => problems.push(format!("line {}: {reference}: {problem}", index + 1)),
                    Ok(value) => match quote(&value, quoting, out.ends_with([' ', ':'])) {
                        Ok(quoted) => {
                            out.push_str(&quoted);
                            if !value.is_empty() {
                                values.push((value, reference.to_owned()));
                            }
                        }
                        Err(problem) => problems.push(format!("line {}: {reference}: {problem}", index + 1)),
                    },
                }
                rest = &rest[end + 1..];
                continue;
            }
            quoting = match (quoting, c) {
                (Quoting::Plain, '"') => Quoting::Double,
                (Quoting::Plain, '\'') => Quoting::Single,
                (Quoting::Double, '"') => Quoting::Plain,
                (Quoting::Single, '\'') => Quoting::Plain,
                (Quoting::Plain, '#') if out.ends_with([' ', '\t']) => {
                    // A comment: the rest of the line is not expanded.
                    out.push_str(rest);
                    break;
                }
                (state, _) => state,
            };
            // A backslash escape inside double quotes (`\"` does not end the scalar).
            if quoting == Quoting::Double && c == '\\' && rest.len() > 1 {
                let escaped = rest[1..].chars().next().map_or(1, char::len_utf8);
                out.push_str(&rest[..1 + escaped]);
                rest = &rest[1 + escaped..];
                continue;
            }
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    if problems.is_empty() { Ok(Expanded { text: out, values }) } else { Err(problems) }
}

/// The value of `env:NAME` or `env:NAME:-default`.
fn resolve(inner: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let Some(spec) = inner.strip_prefix("env:") else {
        return Err("only environment references (`${env:NAME}`) are expanded; write `$$` for a literal `$`".into());
    };
    let (name, default) = match spec.split_once(":-") {
        Some((name, default)) => (name, Some(default)),
        None => (spec, None),
    };
    let valid = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return Err(format!("{name:?} is not a variable name (letters, digits and `_`)"));
    }
    match (lookup(name), default) {
        (Some(value), _) => Ok(value),
        (None, Some(default)) => Ok(default.to_owned()),
        (None, None) => {
            Err(format!("the environment variable {name} is not set (give a default with `${{env:{name}:-...}}`)"))
        }
    }
}

/// `value` written into a scalar of the given quoting; `at_start` when nothing of the scalar
/// precedes it.
fn quote(value: &str, quoting: Quoting, at_start: bool) -> Result<String, String> {
    match quoting {
        Quoting::Double => {
            let mut out = String::with_capacity(value.len());
            for c in value.chars() {
                match c {
                    '"' => out.push_str("\\\""),
                    '\\' => out.push_str("\\\\"),
                    '\n' => out.push_str("\\n"),
                    '\t' => out.push_str("\\t"),
                    c if c.is_control() => out.push_str(&format!("\\u{:04x}", u32::from(c))),
                    c => out.push(c),
                }
            }
            Ok(out)
        }
        Quoting::Single if value.contains(['\n', '\r']) => {
            Err("the value has a line break: use a double-quoted scalar".into())
        }
        Quoting::Single => Ok(value.replace('\'', "''")),
        Quoting::Plain => {
            let structural = value.contains(['\n', '\r', ',', '[', ']', '{', '}'])
                || value.contains(": ")
                || value.contains(" #")
                || value.ends_with(':')
                || value.starts_with(' ')
                || value.ends_with(' ')
                || (at_start
                    && value.starts_with(['-', '?', ':', '#', '&', '*', '!', '|', '>', '\'', '"', '%', '@', '`']));
            if structural {
                Err("the value would be read as YAML structure: quote the reference (\"${env:...}\")".into())
            } else {
                Ok(value.to_owned())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "TOKEN" => Some("s3cr\"et\\x".into()),
            "HOST" => Some("backend.example:4317".into()),
            "PLAIN" => Some("abc123".into()),
            "TRICKY" => Some("a: b, c".into()),
            "QUOTE" => Some("it's".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    fn expanded(text: &str) -> String {
        expand(text, &env).unwrap_or_else(|problems| panic!("{problems:?}")).text
    }

    #[test]
    fn references_are_expanded_and_escaped_for_their_scalar() {
        assert_eq!(expanded("a: \"Bearer ${env:TOKEN}\"\n"), "a: \"Bearer s3cr\\\"et\\\\x\"\n");
        assert_eq!(expanded("a: ${env:PLAIN}\n"), "a: abc123\n");
        assert_eq!(
            expanded("a: { endpoint: \"http://${env:HOST}\" }\n"),
            "a: { endpoint: \"http://backend.example:4317\" }\n"
        );
        assert_eq!(expanded("a: '${env:QUOTE}'\n"), "a: 'it''s'\n");
        assert_eq!(expanded("a: \"${env:TRICKY}\"\n"), "a: \"a: b, c\"\n");
        assert_eq!(expanded("a: \"${env:MISSING:-fallback}\"\n"), "a: \"fallback\"\n");
        assert_eq!(expanded("a: \"x${env:EMPTY}y\"\n"), "a: \"xy\"\n");
        // `$$` is a dollar; a lone `$` stays; a regex's `$` is not a reference.
        assert_eq!(
            expanded("a: \"$${env:PLAIN} costs $5\"\nb: '^/item/\\d+$'\n"),
            "a: \"${env:PLAIN} costs $5\"\nb: '^/item/\\d+$'\n"
        );
        // An escaped quote does not end the double-quoted scalar.
        assert_eq!(expanded("a: \"say \\\"${env:TRICKY}\\\"\"\n"), "a: \"say \\\"a: b, c\\\"\"\n");
        // Comments are left alone, whole-line or trailing.
        assert_eq!(expanded("# ${env:MISSING}\na: 1 # ${env:MISSING}\n"), "# ${env:MISSING}\na: 1 # ${env:MISSING}\n");
    }

    #[test]
    fn what_cannot_be_expanded_safely_is_a_problem_with_its_line() {
        let problems =
            expand("a: 1\nb: ${env:MISSING}\nc: ${env:TRICKY}\nd: ${file:/x}\ne: ${env:1X}\nf: ${env:PLAIN\n", &env)
                .unwrap_err();
        assert_eq!(problems.len(), 5, "{problems:#?}");
        assert!(
            problems[0].starts_with("line 2: ${env:MISSING}: the environment variable MISSING is not set"),
            "{}",
            problems[0]
        );
        assert!(
            problems[1].starts_with("line 3: ${env:TRICKY}: the value would be read as YAML structure"),
            "{}",
            problems[1]
        );
        assert!(problems[2].contains("only environment references"), "{}", problems[2]);
        assert!(problems[3].contains("is not a variable name"), "{}", problems[3]);
        assert!(problems[4].starts_with("line 6: `${` without a closing"), "{}", problems[4]);
    }

    #[test]
    fn expanded_values_are_redacted_from_messages() {
        let expanded = expand("a: \"${env:TOKEN}\"\nb: ${env:PLAIN}\nc: \"${env:EMPTY}\"\n", &env).unwrap();
        let message = "invalid value s3cr\"et\\x near abc123";
        assert_eq!(expanded.redact(message), "invalid value ${env:TOKEN} near ${env:PLAIN}");
    }
}
