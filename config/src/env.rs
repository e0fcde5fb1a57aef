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
        // One pass, longest value first at each position, so a reference written in does not
        // get rewritten by a later, shorter value.
        let mut values: Vec<&(String, String)> = self.values.iter().collect();
        values.sort_by_key(|(value, _)| std::cmp::Reverse(value.len()));
        let mut out = String::with_capacity(message.len());
        let mut rest = message;
        'scan: while let Some(c) = rest.chars().next() {
            for (value, reference) in &values {
                if rest.starts_with(value.as_str()) {
                    out.push_str(reference);
                    rest = &rest[value.len()..];
                    continue 'scan;
                }
            }
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
        out
    }

    /// Whether any value from the environment went into the text (then parse errors must not
    /// quote the text: a cropped secret would escape redaction).
    pub fn has_values(&self) -> bool {
        !self.values.is_empty()
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Quoting {
    Plain,
    Single,
    Double,
}

/// Values shorter than this are not redacted from messages: they would match ordinary words
/// (`info`, `1`); secrets are longer.
const MIN_REDACTED_LEN: usize = 4;

/// Where the scanner stands in the YAML text: in a plain scalar or structure, or inside a
/// quoted scalar (which may continue over several lines).
struct Scanner {
    quoting: Quoting,
    /// The last non-blank character outside quotes on this line (`None` at the line's start).
    previous: Option<char>,
    /// Whether blanks followed `previous`.
    blank_since: bool,
}

impl Scanner {
    /// Whether a scalar would start here: at a line's start (after indentation), after a
    /// mapping `:` or sequence `-` followed by a blank, or after a flow `[`, `{` or `,`.
    fn at_scalar_start(&self) -> bool {
        match self.previous {
            None => true,
            Some('[' | '{' | ',') => true,
            Some(':' | '-') => self.blank_since,
            _ => false,
        }
    }

    fn saw(&mut self, c: char) {
        if c == ' ' || c == '\t' {
            self.blank_since = true;
        } else {
            self.previous = Some(c);
            self.blank_since = false;
        }
    }
}

/// Expands `text` with `lookup` for the variables; every problem is listed (line numbers are
/// 1-based).
pub(crate) fn expand(text: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<Expanded, Vec<String>> {
    let mut out = String::with_capacity(text.len());
    let mut values = Vec::new();
    let mut problems = Vec::new();
    let mut scanner = Scanner { quoting: Quoting::Plain, previous: None, blank_since: false };
    for (index, line) in text.split_inclusive('\n').enumerate() {
        scanner.previous = None;
        scanner.blank_since = false;
        if scanner.quoting == Quoting::Plain && line.trim_start().starts_with('#') {
            out.push_str(line);
            continue;
        }
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
                    Ok((value, from_environment)) => {
                        match quote(&value, scanner.quoting, scanner.at_scalar_start()) {
                            Ok(quoted) => {
                                if from_environment && value.chars().count() >= MIN_REDACTED_LEN {
                                    if quoted != value {
                                        values.push((quoted.clone(), reference.to_owned()));
                                    }
                                    values.push((value, reference.to_owned()));
                                }
                                out.push_str(&quoted);
                                if scanner.quoting == Quoting::Plain {
                                    // The value is part of a plain scalar now.
                                    scanner.saw('x');
                                }
                            }
                            Err(problem) => problems.push(format!("line {}: {reference}: {problem}", index + 1)),
                        }
                    }
                }
                rest = &rest[end + 1..];
                continue;
            }
            match scanner.quoting {
                Quoting::Plain => {
                    if c == '#' && (scanner.previous.is_none() || scanner.blank_since) {
                        // A comment: the rest of the line is not expanded.
                        out.push_str(rest);
                        break;
                    }
                    // A quote opens a quoted scalar only where a scalar starts; elsewhere it
                    // is a character of a plain scalar (`shop's`).
                    if (c == '"' || c == '\'') && scanner.at_scalar_start() {
                        scanner.quoting = if c == '"' { Quoting::Double } else { Quoting::Single };
                    }
                    scanner.saw(c);
                }
                Quoting::Double => {
                    if c == '\\' && rest.len() > 1 {
                        // An escape (`\"` does not end the scalar).
                        let escaped = rest[1..].chars().next().map_or(0, char::len_utf8);
                        out.push_str(&rest[..1 + escaped]);
                        rest = &rest[1 + escaped..];
                        continue;
                    }
                    if c == '"' {
                        scanner.quoting = Quoting::Plain;
                        scanner.saw(c);
                    }
                }
                Quoting::Single => {
                    if c == '\'' && rest[1..].starts_with('\'') {
                        // `''` is a quote inside the scalar.
                        out.push_str("''");
                        rest = &rest[2..];
                        continue;
                    }
                    if c == '\'' {
                        scanner.quoting = Quoting::Plain;
                        scanner.saw(c);
                    }
                }
            }
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    if problems.is_empty() { Ok(Expanded { text: out, values }) } else { Err(problems) }
}

/// The value of `env:NAME` or `env:NAME:-default`.
fn resolve(inner: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<(String, bool), String> {
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
        (Some(value), _) => Ok((value, true)),
        (None, Some(default)) => Ok((default.to_owned(), false)),
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
                || value.contains(":\t")
                || value.contains(" #")
                || value.contains("\t#")
                || value.ends_with(':')
                || value.starts_with([' ', '\t'])
                || value.ends_with([' ', '\t'])
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
    fn quotes_inside_plain_scalars_and_multi_line_quoted_scalars_are_read_as_yaml_does() {
        // `shop's` is a plain scalar: its quote does not open a quoted one, so a value with
        // structure in it is refused rather than injected.
        let problems = expand("a: {b: shop's-${env:TRICKY}}\n", &env).unwrap_err();
        assert!(problems[0].contains("would be read as YAML structure"), "{problems:?}");
        // A double-quoted scalar continuing on the next line: the value is escaped there too.
        assert_eq!(expanded("a: \"first\n  ${env:TOKEN}\"\n"), "a: \"first\n  s3cr\\\"et\\\\x\"\n");
        // Anchors, aliases and tags cannot be injected where a scalar starts in a flow sequence.
        let env_star = |name: &str| (name == "G").then(|| "*anchor".to_owned());
        assert!(expand("a: [${env:G}]\n", &env_star).is_err());
        assert!(expand("${env:G}: 1\n", &env_star).is_err());
        // ...but inside a plain scalar they are only characters.
        assert_eq!(expand("a: x${env:G}\n", &env_star).unwrap().text, "a: x*anchor\n");
        // Tabs count as blanks for structure.
        let env_tab = |name: &str| (name == "T").then(|| "a:\tb".to_owned());
        assert!(expand("a: ${env:T}\n", &env_tab).is_err());
    }

    #[test]
    fn expanded_values_are_redacted_from_messages() {
        let expanded =
            expand("a: \"${env:TOKEN}\"\nb: ${env:PLAIN}\nc: \"${env:EMPTY}\"\nd: ${env:NO:-info}\n", &env).unwrap();
        let message = "invalid value s3cr\"et\\x near abc123, info";
        assert_eq!(expanded.redact(message), "invalid value ${env:TOKEN} near ${env:PLAIN}, info");
        // The escaped form written into the text is redacted too.
        assert_eq!(expanded.redact("at `s3cr\\\"et\\\\x`"), "at `${env:TOKEN}`");
    }
}
