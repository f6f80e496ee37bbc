//! Templates: JSON values and strings with `{{ reference }}` placeholders, filled
//! from the saga's input and the outputs of earlier steps.
//!
//! A reference is a dotted path into the *context*:
//! - `input.<path>` — the saga's input;
//! - `saga.id`, `saga.name` — the instance;
//! - `steps.<step>.output.<path>` — what a step answered (its JSON body).
//!
//! Path segments are object keys or array indices (`input.items.0.sku`).
//! A string that is exactly one placeholder (`"{{input.amount}}"`) becomes the
//! referenced JSON value, keeping its type; placeholders inside longer strings are
//! replaced by the value's text (strings as they are, anything else as JSON).
//!
//! ```
//! use serde_json::json;
//! use trellis_saga::template::{Context, render};
//!
//! let ctx = Context::new("s-1", "transfer", json!({"from": "alice", "amount": 5}));
//! let body = json!({"account": "{{input.from}}", "amount": "{{input.amount}}", "memo": "saga {{saga.id}}"});
//! assert_eq!(
//!     render(&body, &ctx).unwrap(),
//!     json!({"account": "alice", "amount": 5, "memo": "saga s-1"})
//! );
//! ```

use std::fmt;

use serde_json::{Map, Value};

/// A placeholder's reference, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// The segments after splitting on `.`.
    pub segments: Vec<String>,
}

impl Reference {
    /// The step a `steps.<step>...` reference names.
    pub fn step(&self) -> Option<&str> {
        match self.segments.as_slice() {
            [root, step, ..] if root == "steps" => Some(step),
            _ => None,
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.segments.join("."))
    }
}

/// Why a template can't be parsed or filled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TemplateError {
    /// A `{{` without its `}}`, or an empty or malformed reference.
    #[error("invalid template {template:?}: {reason}")]
    Syntax {
        /// The string holding the placeholder.
        template: String,
        /// What is wrong.
        reason: String,
    },
    /// The reference's root is not `input`, `saga` or `steps`, or a `steps`
    /// reference lacks `.output`.
    #[error(
        "invalid reference {{{{{0}}}}}: references start with input., saga.id, saga.name or steps.<step>.output"
    )]
    Root(String),
    /// The reference names nothing in the context.
    #[error("{{{{{0}}}}} refers to nothing: no such value")]
    Unresolved(String),
}

/// The values references are resolved against.
#[derive(Debug, Clone, PartialEq)]
pub struct Context {
    root: Value,
}

impl Context {
    /// A context for saga `id` of definition `name`, with its input and no step
    /// outputs yet.
    pub fn new(id: &str, name: &str, input: Value) -> Self {
        let mut root = Map::new();
        root.insert("input".into(), input);
        root.insert("saga".into(), serde_json::json!({ "id": id, "name": name }));
        root.insert("steps".into(), Value::Object(Map::new()));
        Self {
            root: Value::Object(root),
        }
    }

    /// Adds what `step` answered.
    pub fn with_output(mut self, step: &str, output: Value) -> Self {
        if let Some(Value::Object(steps)) = self.root.get_mut("steps") {
            steps.insert(step.to_owned(), serde_json::json!({ "output": output }));
        }
        self
    }

    fn resolve(&self, reference: &Reference) -> Option<&Value> {
        let mut at = &self.root;
        for segment in &reference.segments {
            at = match at {
                Value::Object(map) => map.get(segment)?,
                Value::Array(items) => items.get(segment.parse::<usize>().ok()?)?,
                _ => return None,
            };
        }
        Some(at)
    }
}

/// One piece of a string template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Ref(Reference),
}

fn syntax(template: &str, reason: &str) -> TemplateError {
    TemplateError::Syntax {
        template: template.to_owned(),
        reason: reason.to_owned(),
    }
}

fn parse_reference(template: &str, text: &str) -> Result<Reference, TemplateError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(syntax(template, "empty placeholder {{}}"));
    }
    let segments: Vec<String> = text.split('.').map(str::to_owned).collect();
    if segments.iter().any(|s| {
        s.is_empty()
            || !s
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
    }) {
        return Err(syntax(
            template,
            &format!("reference {text:?} must be dot-separated names of letters, digits, _ and -"),
        ));
    }
    let valid_root = match segments.as_slice() {
        [root, ..] if root == "input" => true,
        [root, field] if root == "saga" => field == "id" || field == "name",
        [root, _step, output, ..] if root == "steps" => output == "output",
        _ => false,
    };
    if !valid_root {
        return Err(TemplateError::Root(text.to_owned()));
    }
    Ok(Reference { segments })
}

fn parse(template: &str) -> Result<Vec<Part>, TemplateError> {
    let mut parts = Vec::new();
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        if start > 0 {
            parts.push(Part::Text(rest[..start].to_owned()));
        }
        let after = &rest[start + 2..];
        let end = after
            .find("}}")
            .ok_or_else(|| syntax(template, "a {{ has no closing }}"))?;
        parts.push(Part::Ref(parse_reference(template, &after[..end])?));
        rest = &after[end + 2..];
    }
    if rest.contains("}}") {
        return Err(syntax(template, "a }} has no opening {{"));
    }
    if !rest.is_empty() {
        parts.push(Part::Text(rest.to_owned()));
    }
    Ok(parts)
}

/// Every reference in `value` (in its strings, at any depth).
///
/// # Errors
/// [`TemplateError`] for the first malformed placeholder.
pub fn references(value: &Value) -> Result<Vec<Reference>, TemplateError> {
    let mut out = Vec::new();
    collect(value, &mut out)?;
    Ok(out)
}

/// Every reference in the string template `s`.
///
/// # Errors
/// [`TemplateError`] for the first malformed placeholder.
pub fn str_references(s: &str) -> Result<Vec<Reference>, TemplateError> {
    Ok(parse(s)?
        .into_iter()
        .filter_map(|p| match p {
            Part::Ref(r) => Some(r),
            Part::Text(_) => None,
        })
        .collect())
}

fn collect(value: &Value, out: &mut Vec<Reference>) -> Result<(), TemplateError> {
    match value {
        Value::String(s) => out.extend(str_references(s)?),
        Value::Array(items) => {
            for item in items {
                collect(item, out)?;
            }
        }
        Value::Object(map) => {
            for item in map.values() {
                collect(item, out)?;
            }
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
    Ok(())
}

/// Fills every placeholder in `value`.
///
/// # Errors
/// [`TemplateError::Unresolved`] for a reference to nothing, or a syntax error.
pub fn render(value: &Value, ctx: &Context) -> Result<Value, TemplateError> {
    Ok(match value {
        Value::String(s) => render_value(s, ctx)?,
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|v| render(v, ctx))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| Ok((k.clone(), render(v, ctx)?)))
                .collect::<Result<_, TemplateError>>()?,
        ),
        other => other.clone(),
    })
}

fn render_value(s: &str, ctx: &Context) -> Result<Value, TemplateError> {
    let parts = parse(s)?;
    if let [Part::Ref(r)] = parts.as_slice() {
        return ctx
            .resolve(r)
            .cloned()
            .ok_or_else(|| TemplateError::Unresolved(r.to_string()));
    }
    Ok(Value::String(join(&parts, ctx, |t| t.to_owned())?))
}

/// Fills the placeholders of a string template.
///
/// # Errors
/// As [`render`].
pub fn render_str(s: &str, ctx: &Context) -> Result<String, TemplateError> {
    join(&parse(s)?, ctx, |t| t.to_owned())
}

/// Fills the placeholders of a URL path template, percent-encoding each value so
/// that it stays within its segment (`/`, `?`, `#`, `%` and the like are escaped).
///
/// # Errors
/// As [`render`].
pub fn render_path(s: &str, ctx: &Context) -> Result<String, TemplateError> {
    join(&parse(s)?, ctx, encode_segment)
}

fn join(
    parts: &[Part],
    ctx: &Context,
    encode: impl Fn(&str) -> String,
) -> Result<String, TemplateError> {
    let mut out = String::new();
    for part in parts {
        match part {
            Part::Text(t) => out.push_str(t),
            Part::Ref(r) => {
                let value = ctx
                    .resolve(r)
                    .ok_or_else(|| TemplateError::Unresolved(r.to_string()))?;
                let text = match value {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                out.push_str(&encode(&text));
            }
        }
    }
    Ok(out)
}

fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod test {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    fn ctx() -> Context {
        Context::new(
            "s1",
            "transfer",
            json!({"a": {"b": [10, {"c": "x/y"}]}, "n": 3}),
        )
        .with_output("debit", json!({"ref": "r-1", "ok": true}))
    }

    #[test]
    fn whole_placeholders_keep_types() {
        let t = json!({"n": "{{input.n}}", "deep": "{{ input.a.b.1.c }}", "o": "{{steps.debit.output}}"});
        assert_eq!(
            render(&t, &ctx()).expect("render"),
            json!({"n": 3, "deep": "x/y", "o": {"ref": "r-1", "ok": true}})
        );
    }

    #[test]
    fn embedded_placeholders_become_text() {
        assert_eq!(
            render(
                &json!("{{saga.name}}-{{input.n}}-{{steps.debit.output.ok}}"),
                &ctx()
            )
            .expect("render"),
            json!("transfer-3-true")
        );
        assert_eq!(
            render_path("/accounts/{{input.a.b.1.c}}/debit", &ctx()).expect("path"),
            "/accounts/x%2Fy/debit"
        );
    }

    #[test]
    fn errors_name_the_reference() {
        assert_eq!(
            render(&json!("{{input.missing}}"), &ctx()),
            Err(TemplateError::Unresolved("input.missing".into()))
        );
        assert!(matches!(
            references(&json!(["{{input.a"])),
            Err(TemplateError::Syntax { .. })
        ));
        assert!(matches!(
            references(&json!("a }} b")),
            Err(TemplateError::Syntax { .. })
        ));
        assert!(matches!(
            references(&json!("{{}}")),
            Err(TemplateError::Syntax { .. })
        ));
        assert_eq!(
            references(&json!("{{env.HOME}}")),
            Err(TemplateError::Root("env.HOME".into()))
        );
        assert_eq!(
            references(&json!("{{steps.debit.ref}}")),
            Err(TemplateError::Root("steps.debit.ref".into()))
        );
        assert!(matches!(
            references(&json!("{{input..a}}")),
            Err(TemplateError::Syntax { .. })
        ));
    }

    #[test]
    fn references_are_found_at_any_depth() {
        let refs = references(&json!({"x": ["{{input.a}}", {"y": "p{{steps.s.output.z}}q"}]}))
            .expect("refs");
        let steps: Vec<Option<&str>> = refs.iter().map(Reference::step).collect();
        assert_eq!(steps, [None, Some("s")]);
    }

    proptest! {
        /// Text without braces renders to itself; a value inserted whole comes back.
        #[test]
        fn plain_text_and_whole_values_round_trip(text in "[^{}]*", n in any::<i64>()) {
            let ctx = Context::new("i", "d", json!({"v": n, "t": text.clone()}));
            prop_assert_eq!(render(&json!(text.clone()), &ctx).ok(), Some(json!(text.clone())));
            prop_assert_eq!(render(&json!("{{input.v}}"), &ctx).ok(), Some(json!(n)));
            prop_assert_eq!(render(&json!("{{input.t}}"), &ctx).ok(), Some(json!(text)));
        }

        /// Any rendered path value stays inside one path segment.
        #[test]
        fn path_values_never_add_segments(value in ".*") {
            let ctx = Context::new("i", "d", json!({"v": value}));
            let path = render_path("/a/{{input.v}}", &ctx).expect("render");
            prop_assert_eq!(path.matches('/').count(), 2);
            prop_assert!(!path.contains('?') && !path.contains('#'));
        }
    }
}
