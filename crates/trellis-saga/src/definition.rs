//! Saga definitions: ordered steps, each an action and an optional compensation.
//!
//! A definition is data — it comes from `[sagas.<name>]` in config, from
//! `PUT /v1/sagas/definitions/{name}`, or from [`SagaDefinition::builder`] — and is
//! checked once by [`SagaDefinition::validate`]: names, retry policies, and every
//! template reference (an action may use the input and the outputs of *earlier*
//! steps; a compensation may also use its own step's output).
//!
//! ```
//! use serde_json::json;
//! use trellis_saga::definition::{Action, SagaDefinition, Step};
//!
//! let transfer = SagaDefinition::builder("transfer")
//!     .step(
//!         Step::new("debit", Action::invoke("accounts", "POST", "/accounts/{{input.from}}/debit")
//!             .with_body(json!({"amount": "{{input.amount}}"})))
//!             .compensate(Action::invoke("accounts", "POST", "/accounts/{{input.from}}/credit")
//!                 .with_body(json!({"amount": "{{input.amount}}"}))),
//!     )
//!     .step(Step::new("credit", Action::invoke("accounts", "POST", "/accounts/{{input.to}}/credit")
//!         .with_body(json!({"amount": "{{input.amount}}", "debit": "{{steps.debit.output.ref}}"}))))
//!     .pivot("credit")
//!     .build()
//!     .expect("valid");
//! assert_eq!(transfer.steps.len(), 2);
//! ```

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::template::{self, Reference, TemplateError};

/// Most steps in one saga.
pub const MAX_STEPS: usize = 64;
/// Longest step or saga timeout.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(3600);

/// A saga: what to do, in order, and how to undo it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SagaDefinition {
    /// The definition's name (from the path or config key; a body may omit it).
    #[serde(default)]
    pub name: String,
    /// What it is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The steps, run in order.
    pub steps: Vec<Step>,
    /// The pivot step: once it succeeded, the saga only moves forward (later
    /// failures are retried, then parked, never compensated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pivot: Option<String>,
    /// How compensations are retried before the saga is parked as
    /// `needs_attention`.
    #[serde(default = "RetryPolicy::compensation")]
    pub compensation_retry: RetryPolicy,
}

/// One step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// Unique within the saga: letters, digits, `_` and `-`.
    pub name: String,
    /// What the step does.
    pub action: Action,
    /// What undoes it (none: nothing to undo).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compensation: Option<Action>,
    /// How the action is retried.
    #[serde(default)]
    pub retry: RetryPolicy,
    /// How long one attempt (of the action or the compensation) may take.
    #[serde(
        default = "default_timeout",
        deserialize_with = "trellis_core::config::units::duration",
        serialize_with = "serialize_duration"
    )]
    pub timeout: Duration,
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

fn serialize_duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
}

impl Step {
    /// A step with default retry and timeout and no compensation.
    pub fn new(name: impl Into<String>, action: Action) -> Self {
        Self {
            name: name.into(),
            action,
            compensation: None,
            retry: RetryPolicy::default(),
            timeout: default_timeout(),
        }
    }

    /// Sets the compensation.
    #[must_use]
    pub fn compensate(mut self, action: Action) -> Self {
        self.compensation = Some(action);
        self
    }

    /// Sets the retry policy.
    #[must_use]
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Sets the per-attempt timeout.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
}

/// What a step (or its compensation) does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Action {
    /// Calls a route of an app through `/v1/invoke` (with its resilience policies).
    /// The answer's JSON body is the step's output; 2xx succeeds, 408/429/5xx and
    /// transport errors are retried, other statuses fail the step at once.
    Invoke {
        /// The app (`[apps.<id>]`).
        app: String,
        /// The HTTP method. Default `POST`.
        #[serde(default = "default_method")]
        method: String,
        /// The path on the app, a string template.
        path: String,
        /// The JSON body, a template (none: no body).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        body: Option<Value>,
        /// Extra headers (values are string templates).
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        headers: BTreeMap<String, String>,
    },
    /// Publishes a CloudEvent whose data is the template `data`.
    Publish {
        /// The pub/sub component.
        pubsub: String,
        /// The topic.
        topic: String,
        /// The event's data, a template.
        #[serde(default)]
        data: Value,
        /// The CloudEvents `type`. Default `trellis.saga.step`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        event_type: Option<String>,
    },
}

fn default_method() -> String {
    "POST".to_owned()
}

impl Action {
    /// An invoke of `method path` on `app`, without a body.
    pub fn invoke(app: impl Into<String>, method: &str, path: impl Into<String>) -> Self {
        Self::Invoke {
            app: app.into(),
            method: method.to_owned(),
            path: path.into(),
            body: None,
            headers: BTreeMap::new(),
        }
    }

    /// A publish of `data` to `topic` on `pubsub`.
    pub fn publish(pubsub: impl Into<String>, topic: impl Into<String>, data: Value) -> Self {
        Self::Publish {
            pubsub: pubsub.into(),
            topic: topic.into(),
            data,
            event_type: None,
        }
    }

    /// Sets the body of an invoke (a publish is unchanged).
    #[must_use]
    pub fn with_body(mut self, value: Value) -> Self {
        if let Self::Invoke { body, .. } = &mut self {
            *body = Some(value);
        }
        self
    }

    fn references(&self) -> Result<Vec<Reference>, TemplateError> {
        match self {
            Self::Invoke {
                path,
                body,
                headers,
                ..
            } => {
                let mut refs = template::str_references(path)?;
                if let Some(body) = body {
                    refs.extend(template::references(body)?);
                }
                for value in headers.values() {
                    refs.extend(template::str_references(value)?);
                }
                Ok(refs)
            }
            Self::Publish { data, .. } => template::references(data),
        }
    }
}

/// How an action is retried: exponential backoff from `initial_backoff`, times
/// `multiplier`, capped at `max_backoff`, for at most `max_attempts` attempts in all.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (≥ 1). Default 3.
    pub max_attempts: u32,
    /// Wait before the second attempt. Default 100ms.
    #[serde(
        deserialize_with = "trellis_core::config::units::duration",
        serialize_with = "serialize_duration"
    )]
    pub initial_backoff: Duration,
    /// Longest wait. Default 10s.
    #[serde(
        deserialize_with = "trellis_core::config::units::duration",
        serialize_with = "serialize_duration"
    )]
    pub max_backoff: Duration,
    /// Growth per attempt (≥ 1). Default 2.
    pub multiplier: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            multiplier: 2.0,
        }
    }
}

impl RetryPolicy {
    /// The default for compensations: 10 attempts, 200ms growing to 30s.
    pub fn compensation() -> Self {
        Self {
            max_attempts: 10,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(30),
            multiplier: 2.0,
        }
    }

    /// The wait after failed attempt number `attempt` (1-based).
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exponent = i32::try_from(attempt.saturating_sub(1)).unwrap_or(i32::MAX);
        let secs = self.initial_backoff.as_secs_f64() * self.multiplier.powi(exponent);
        if secs.is_finite() && secs < self.max_backoff.as_secs_f64() {
            Duration::from_secs_f64(secs.max(0.0))
        } else {
            self.max_backoff
        }
    }

    fn validate(&self, at: &str, errors: &mut Vec<DefinitionError>) {
        if self.max_attempts == 0 {
            errors.push(DefinitionError::new(
                format!("{at}.max_attempts"),
                "must be at least 1",
            ));
        }
        if !(self.multiplier.is_finite() && self.multiplier >= 1.0) {
            errors.push(DefinitionError::new(
                format!("{at}.multiplier"),
                "must be a number ≥ 1",
            ));
        }
        if self.max_backoff < self.initial_backoff {
            errors.push(DefinitionError::new(
                format!("{at}.max_backoff"),
                "must not be shorter than initial_backoff",
            ));
        }
        if self.max_backoff > MAX_TIMEOUT {
            errors.push(DefinitionError::new(
                format!("{at}.max_backoff"),
                "must be at most 1h",
            ));
        }
    }
}

/// One thing wrong with a definition, at a path such as `steps[1].action.path`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{at}: {reason}")]
pub struct DefinitionError {
    /// Where (`name`, `steps[0].compensation.body`, ...).
    pub at: String,
    /// What is wrong.
    pub reason: String,
    /// A stable code: `invalid_template` for template errors, `invalid_definition`
    /// for the rest.
    pub code: &'static str,
}

impl DefinitionError {
    fn new(at: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            at: at.into(),
            reason: reason.into(),
            code: "invalid_definition",
        }
    }

    fn template(at: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            at: at.into(),
            reason: reason.into(),
            code: "invalid_template",
        }
    }
}

/// Whether `name` is a valid saga or step name: 1–128 ASCII letters, digits, `_`,
/// `-` and `.`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

impl SagaDefinition {
    /// Starts a definition named `name`.
    pub fn builder(name: impl Into<String>) -> Builder {
        Builder {
            definition: Self {
                name: name.into(),
                description: None,
                steps: Vec::new(),
                pivot: None,
                compensation_retry: RetryPolicy::compensation(),
            },
        }
    }

    /// The index of the step named `name`.
    pub fn step_index(&self, name: &str) -> Option<usize> {
        self.steps.iter().position(|s| s.name == name)
    }

    /// The pivot step's index, if there is one.
    pub fn pivot_index(&self) -> Option<usize> {
        self.pivot.as_deref().and_then(|p| self.step_index(p))
    }

    /// Checks everything; returns every problem found.
    ///
    /// # Errors
    /// Every [`DefinitionError`], each naming where it is.
    pub fn validate(&self) -> Result<(), Vec<DefinitionError>> {
        let mut errors = Vec::new();
        if !valid_name(&self.name) {
            errors.push(DefinitionError::new(
                "name",
                format!(
                    "{:?} is not a valid name: 1-128 letters, digits, '_', '-' and '.'",
                    self.name
                ),
            ));
        }
        if self.steps.is_empty() {
            errors.push(DefinitionError::new(
                "steps",
                "a saga needs at least one step",
            ));
        }
        if self.steps.len() > MAX_STEPS {
            errors.push(DefinitionError::new(
                "steps",
                format!("{} steps; the limit is {MAX_STEPS}", self.steps.len()),
            ));
        }
        self.compensation_retry
            .validate("compensation_retry", &mut errors);
        let mut seen = HashSet::new();
        for (i, step) in self.steps.iter().enumerate() {
            let at = format!("steps[{i}]");
            if !valid_name(&step.name) {
                errors.push(DefinitionError::new(
                    format!("{at}.name"),
                    format!("{:?} is not a valid step name", step.name),
                ));
            } else if !seen.insert(step.name.as_str()) {
                errors.push(DefinitionError::new(
                    format!("{at}.name"),
                    format!("step {:?} is defined twice", step.name),
                ));
            }
            if step.timeout.is_zero() || step.timeout > MAX_TIMEOUT {
                errors.push(DefinitionError::new(
                    format!("{at}.timeout"),
                    "must be more than 0 and at most 1h",
                ));
            }
            step.retry.validate(&format!("{at}.retry"), &mut errors);
            let earlier: HashSet<&str> = self.steps[..i].iter().map(|s| s.name.as_str()).collect();
            check_action(&step.action, &format!("{at}.action"), &earlier, &mut errors);
            if let Some(compensation) = &step.compensation {
                let mut visible = earlier.clone();
                visible.insert(step.name.as_str());
                check_action(
                    compensation,
                    &format!("{at}.compensation"),
                    &visible,
                    &mut errors,
                );
            }
        }
        if let Some(pivot) = &self.pivot
            && self.step_index(pivot).is_none()
        {
            errors.push(DefinitionError::new(
                "pivot",
                format!("names no step: {pivot:?}"),
            ));
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }
}

fn check_action(
    action: &Action,
    at: &str,
    visible: &HashSet<&str>,
    errors: &mut Vec<DefinitionError>,
) {
    match action {
        Action::Invoke {
            app, method, path, ..
        } => {
            if app.is_empty() {
                errors.push(DefinitionError::new(
                    format!("{at}.app"),
                    "must not be empty",
                ));
            }
            if http::Method::from_bytes(method.as_bytes()).is_err() {
                errors.push(DefinitionError::new(
                    format!("{at}.method"),
                    format!("{method:?} is not an HTTP method"),
                ));
            }
            if !path.starts_with('/') {
                errors.push(DefinitionError::new(
                    format!("{at}.path"),
                    "must start with /",
                ));
            }
        }
        Action::Publish { pubsub, topic, .. } => {
            if pubsub.is_empty() {
                errors.push(DefinitionError::new(
                    format!("{at}.pubsub"),
                    "must not be empty",
                ));
            }
            if topic.is_empty() {
                errors.push(DefinitionError::new(
                    format!("{at}.topic"),
                    "must not be empty",
                ));
            }
        }
    }
    match action.references() {
        Err(e) => errors.push(DefinitionError::template(at, e.to_string())),
        Ok(refs) => {
            for r in refs {
                if let Some(step) = r.step()
                    && !visible.contains(step)
                {
                    errors.push(DefinitionError::template(
                        at,
                        format!(
                            "{{{{{r}}}}} refers to step {step:?}, which does not run before this one"
                        ),
                    ));
                }
            }
        }
    }
}

/// Builds a [`SagaDefinition`] step by step.
#[derive(Debug, Clone)]
pub struct Builder {
    definition: SagaDefinition,
}

impl Builder {
    /// Appends a step.
    #[must_use]
    pub fn step(mut self, step: Step) -> Self {
        self.definition.steps.push(step);
        self
    }

    /// Names the pivot step.
    #[must_use]
    pub fn pivot(mut self, step: impl Into<String>) -> Self {
        self.definition.pivot = Some(step.into());
        self
    }

    /// Sets the description.
    #[must_use]
    pub fn description(mut self, text: impl Into<String>) -> Self {
        self.definition.description = Some(text.into());
        self
    }

    /// Sets how compensations are retried.
    #[must_use]
    pub fn compensation_retry(mut self, retry: RetryPolicy) -> Self {
        self.definition.compensation_retry = retry;
        self
    }

    /// The definition, validated.
    ///
    /// # Errors
    /// Every problem [`SagaDefinition::validate`] finds.
    pub fn build(self) -> Result<SagaDefinition, Vec<DefinitionError>> {
        self.definition.validate()?;
        Ok(self.definition)
    }
}

#[cfg(test)]
mod test {
    use serde_json::json;

    use super::*;

    fn invoke(path: &str) -> Action {
        Action::invoke("app", "POST", path)
    }

    #[test]
    fn parses_from_json_with_defaults() {
        let def: SagaDefinition = serde_json::from_value(json!({
            "steps": [
                {"name": "a", "action": {"type": "invoke", "app": "x", "path": "/a"},
                 "timeout": "2s", "retry": {"max_attempts": 5}},
                {"name": "b", "action": {"type": "publish", "pubsub": "default", "topic": "t",
                 "data": {"a": "{{steps.a.output}}"}}}
            ],
            "pivot": "a"
        }))
        .expect("parse");
        assert_eq!(def.steps[0].timeout, Duration::from_secs(2));
        assert_eq!(def.steps[0].retry.max_attempts, 5);
        assert_eq!(
            def.steps[0].retry.initial_backoff,
            Duration::from_millis(100)
        );
        let def = SagaDefinition {
            name: "t".into(),
            ..def
        };
        def.validate().expect("valid");
        let round: SagaDefinition =
            serde_json::from_value(serde_json::to_value(&def).expect("ser")).expect("de");
        assert_eq!(round, def);
    }

    #[test]
    fn references_must_point_backwards() {
        let errors = SagaDefinition::builder("s")
            .step(
                Step::new("a", invoke("/x/{{steps.b.output.id}}"))
                    .compensate(invoke("/undo/{{steps.a.output.id}}")),
            )
            .step(Step::new("b", invoke("/y/{{steps.a.output.id}}")))
            .build()
            .expect_err("forward reference");
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].at, "steps[0].action");
        assert_eq!(errors[0].code, "invalid_template");
        assert!(errors[0].reason.contains("\"b\""), "{}", errors[0].reason);
    }

    #[test]
    fn reports_every_problem() {
        let mut def = SagaDefinition::builder("bad name!")
            .step(Step::new("a", Action::invoke("", "NOT A METHOD", "nopath")))
            .step(Step::new("a", invoke("/{{input.x")).timeout(Duration::ZERO))
            .pivot("zzz")
            .build()
            .expect_err("invalid");
        def.sort_by(|a, b| a.at.cmp(&b.at));
        let at: Vec<&str> = def.iter().map(|e| e.at.as_str()).collect();
        assert_eq!(
            at,
            [
                "name",
                "pivot",
                "steps[0].action.app",
                "steps[0].action.method",
                "steps[0].action.path",
                "steps[1].action",
                "steps[1].name",
                "steps[1].timeout"
            ]
        );
    }

    #[test]
    fn backoff_grows_and_caps() {
        let p = RetryPolicy {
            max_attempts: 10,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(350),
            multiplier: 2.0,
        };
        let waits: Vec<u128> = (1..=4).map(|a| p.backoff(a).as_millis()).collect();
        assert_eq!(waits, [100, 200, 350, 350]);
        assert_eq!(p.backoff(u32::MAX), Duration::from_millis(350));
    }
}
