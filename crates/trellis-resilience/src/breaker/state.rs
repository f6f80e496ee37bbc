//! The breaker's state machine. No I/O: it takes the time of each event and answers
//! whether a call may proceed; transitions are published as [`BreakerEvent`]s.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::broadcast;
use tokio::time::Instant;

use super::window::{CountWindow, Stats, TimeWindow};
use crate::classify::Outcome;
use crate::error::CircuitOpen;
use trellis_core::config::resiliency::{BreakerConfig, Mode, WindowKind};

/// Which state a breaker is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    /// Calls flow; outcomes are recorded in the window.
    Closed,
    /// Calls are refused until the open wait is over.
    Open,
    /// A few trial calls decide between closed and open.
    HalfOpen,
    /// Calls flow; nothing is recorded.
    Disabled,
    /// Calls are refused until an operator changes the mode.
    ForcedOpen,
}

impl BreakerState {
    /// The value of the `trellis_breaker_state` gauge.
    pub fn gauge(self) -> f64 {
        match self {
            Self::Closed => 0.0,
            Self::Open => 1.0,
            Self::HalfOpen => 2.0,
            Self::Disabled => 3.0,
            Self::ForcedOpen => 4.0,
        }
    }

    /// The snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
            Self::Disabled => "disabled",
            Self::ForcedOpen => "forced_open",
        }
    }
}

impl fmt::Display for BreakerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A state transition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BreakerEvent {
    /// The breaker's name.
    pub breaker: String,
    /// The state before.
    pub from: BreakerState,
    /// The state after.
    pub to: BreakerState,
}

/// What a breaker looks like right now, for APIs and dashboards.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BreakerSnapshot {
    /// The breaker's name.
    pub name: String,
    /// Its state.
    pub state: BreakerState,
    /// Totals of the sliding window (closed) or of the trial calls (half-open).
    pub calls: u32,
    /// Failed calls among them.
    pub failures: u32,
    /// Slow calls among them.
    pub slow_calls: u32,
    /// Failures in percent.
    pub failure_rate: f64,
    /// Slow calls in percent.
    pub slow_call_rate: f64,
    /// Failures in a row.
    pub consecutive_failures: u32,
    /// Trips in a row without closing in between (drives the growing open wait).
    pub trips: u32,
    /// While open: milliseconds until trial calls are let through.
    pub retry_after_ms: Option<u64>,
}

#[derive(Debug)]
enum State {
    Closed,
    Open { until: Instant },
    HalfOpen { permits_left: u32, results: Stats },
    Disabled,
    ForcedOpen,
}

impl State {
    fn public(&self) -> BreakerState {
        match self {
            Self::Closed => BreakerState::Closed,
            Self::Open { .. } => BreakerState::Open,
            Self::HalfOpen { .. } => BreakerState::HalfOpen,
            Self::Disabled => BreakerState::Disabled,
            Self::ForcedOpen => BreakerState::ForcedOpen,
        }
    }
}

#[derive(Debug)]
enum Window {
    Count(CountWindow),
    Time(TimeWindow),
}

impl Window {
    fn new(config: &BreakerConfig, now: Instant) -> Self {
        match config.window {
            WindowKind::Count => Self::Count(CountWindow::new(config.window_size)),
            WindowKind::Time => Self::Time(TimeWindow::new(config.window_size, now)),
        }
    }

    fn record(&mut self, now: Instant, failed: bool, slow: bool) {
        match self {
            Self::Count(w) => w.record(failed, slow),
            Self::Time(w) => w.record(now, failed, slow),
        }
    }

    fn stats(&mut self, now: Instant) -> Stats {
        match self {
            Self::Count(w) => w.stats(),
            Self::Time(w) => w.stats(now),
        }
    }
}

/// The mutable part, behind one mutex.
///
/// Invariants:
/// 1. `generation` changes with every transition; a permit taken in an older
///    generation records nothing.
/// 2. `window` only holds calls of the current closed period.
#[derive(Debug)]
struct Core {
    state: State,
    window: Window,
    consecutive_failures: u32,
    trips: u32,
    generation: u64,
}

#[derive(Debug)]
struct Shared {
    name: String,
    config: BreakerConfig,
    /// A std `Mutex`: held for a few arithmetic steps, never across an `.await`.
    core: Mutex<Core>,
    events: broadcast::Sender<BreakerEvent>,
    calls: [metrics::Counter; 4],
    state_gauge: metrics::Gauge,
}

/// A circuit breaker, shared by every clone.
///
/// ```
/// use std::time::Duration;
/// use trellis_resilience::breaker::{Breaker, BreakerConfig, BreakerState};
/// use trellis_resilience::classify::Outcome;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let config = BreakerConfig { minimum_calls: 2, window_size: 2, ..Default::default() };
/// let breaker = Breaker::new("payments", config).expect("valid");
/// for _ in 0..2 {
///     breaker.try_acquire().expect("closed").record(Outcome::Failure);
/// }
/// assert_eq!(breaker.state(), BreakerState::Open);
/// assert!(breaker.try_acquire().is_err());
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Breaker {
    shared: Arc<Shared>,
}

/// Indices into `Shared::calls`.
const SUCCESS: usize = 0;
const FAILURE: usize = 1;
const SLOW: usize = 2;
const REJECTED: usize = 3;

impl Breaker {
    /// A closed breaker named `name`.
    ///
    /// # Errors
    /// The config's first broken rule, as `(field, message)`.
    pub fn new(
        name: impl Into<String>,
        config: BreakerConfig,
    ) -> Result<Self, (&'static str, String)> {
        config.validate()?;
        let name = name.into();
        let now = Instant::now();
        let state = match config.mode {
            Mode::Auto => State::Closed,
            Mode::Disabled => State::Disabled,
            Mode::ForcedOpen => State::ForcedOpen,
        };
        let counter = |outcome: &'static str| metrics::counter!("trellis_breaker_calls_total", "breaker" => name.clone(), "outcome" => outcome);
        let shared = Shared {
            calls: [
                counter("success"),
                counter("failure"),
                counter("slow"),
                counter("rejected"),
            ],
            state_gauge: metrics::gauge!("trellis_breaker_state", "breaker" => name.clone()),
            core: Mutex::new(Core {
                window: Window::new(&config, now),
                state,
                consecutive_failures: 0,
                trips: 0,
                generation: 0,
            }),
            events: broadcast::channel(64).0,
            name,
            config,
        };
        shared.state_gauge.set(shared.lock().state.public().gauge());
        Ok(Self {
            shared: Arc::new(shared),
        })
    }

    /// The breaker's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Its settings.
    pub fn config(&self) -> &BreakerConfig {
        &self.shared.config
    }

    /// Asks to make a call. On `Ok`, make it and [`record`](Permit::record) how it
    /// went; dropping the permit unrecorded (a cancelled call) records nothing.
    ///
    /// # Errors
    /// [`CircuitOpen`] when the breaker refuses the call.
    pub fn try_acquire(&self) -> Result<Permit, CircuitOpen> {
        let now = Instant::now();
        let mut event = None;
        let result = {
            let mut core = self.shared.lock();
            if let State::Open { until } = core.state
                && now >= until
            {
                event = self.transition(
                    &mut core,
                    State::HalfOpen {
                        permits_left: self.shared.config.half_open_calls,
                        results: Stats::default(),
                    },
                    now,
                );
            }
            let generation = core.generation;
            match &mut core.state {
                State::Closed => Ok(Permit::new(self, generation, now, false, true)),
                State::Disabled => Ok(Permit::new(self, generation, now, false, false)),
                State::HalfOpen { permits_left, .. } if *permits_left > 0 => {
                    *permits_left -= 1;
                    Ok(Permit::new(self, generation, now, true, true))
                }
                State::HalfOpen { .. } => {
                    Err(self.open_error(self.shared.config.open_wait.min(Duration::from_secs(1))))
                }
                State::Open { until } => Err(self.open_error(until.saturating_duration_since(now))),
                State::ForcedOpen => Err(self.open_error(self.shared.config.open_wait)),
            }
        };
        self.publish(event);
        if result.is_err() {
            self.shared.calls[REJECTED].increment(1);
        }
        result
    }

    fn open_error(&self, retry_after: Duration) -> CircuitOpen {
        CircuitOpen {
            name: self.shared.name.clone(),
            retry_after,
        }
    }

    fn on_result(&self, permit: &Permit, outcome: Outcome) {
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(permit.started);
        let config = &self.shared.config;
        let mut event = None;
        {
            let mut core = self.shared.lock();
            if core.generation != permit.generation {
                return;
            }
            let (failed, slow) = match outcome {
                Outcome::Ignored => {
                    if let State::HalfOpen { permits_left, .. } = &mut core.state {
                        *permits_left += 1;
                    }
                    return;
                }
                Outcome::Success => (false, elapsed > config.slow_call_duration),
                Outcome::Failure => (true, elapsed > config.slow_call_duration),
            };
            self.shared.calls[if failed { FAILURE } else { SUCCESS }].increment(1);
            if slow {
                self.shared.calls[SLOW].increment(1);
            }
            core.consecutive_failures = if failed {
                core.consecutive_failures + 1
            } else {
                0
            };
            match &mut core.state {
                State::Closed => {
                    core.window.record(now, failed, slow);
                    let stats = core.window.stats(now);
                    let by_rate = stats.calls >= config.minimum_calls
                        && (stats.failure_rate() >= config.failure_rate
                            || stats.slow_call_rate() >= config.slow_call_rate);
                    let by_streak = config
                        .consecutive_failures
                        .is_some_and(|n| core.consecutive_failures >= n);
                    if by_rate || by_streak {
                        event = self.open(&mut core, now);
                    }
                }
                State::HalfOpen { results, .. } => {
                    results.add(failed, slow);
                    let results = *results;
                    if results.calls >= config.half_open_calls {
                        event = if results.failure_rate() >= config.failure_rate
                            || results.slow_call_rate() >= config.slow_call_rate
                        {
                            self.open(&mut core, now)
                        } else {
                            core.trips = 0;
                            self.transition(&mut core, State::Closed, now)
                        };
                    }
                }
                State::Open { .. } | State::Disabled | State::ForcedOpen => {}
            }
        }
        self.publish(event);
    }

    fn open(&self, core: &mut MutexGuard<'_, Core>, now: Instant) -> Option<BreakerEvent> {
        core.trips += 1;
        let config = &self.shared.config;
        let growth = config
            .open_wait_multiplier
            .powi(i32::try_from(core.trips - 1).unwrap_or(i32::MAX));
        let wait = config
            .open_wait
            .mul_f64(growth.min(1e6))
            .min(config.open_wait_max);
        self.transition(core, State::Open { until: now + wait }, now)
    }

    /// Moves to `to`, starting a new generation. Returns the event to publish once
    /// the lock is released.
    fn transition(
        &self,
        core: &mut MutexGuard<'_, Core>,
        to: State,
        now: Instant,
    ) -> Option<BreakerEvent> {
        let from = core.state.public();
        if matches!(to, State::Closed) {
            core.window = Window::new(&self.shared.config, now);
            core.consecutive_failures = 0;
        }
        core.state = to;
        core.generation += 1;
        let to = core.state.public();
        (from != to).then(|| BreakerEvent {
            breaker: self.shared.name.clone(),
            from,
            to,
        })
    }

    fn publish(&self, event: Option<BreakerEvent>) {
        let Some(event) = event else { return };
        self.shared.state_gauge.set(event.to.gauge());
        metrics::counter!(
            "trellis_breaker_transitions_total",
            "breaker" => event.breaker.clone(), "from" => event.from.as_str(), "to" => event.to.as_str()
        )
        .increment(1);
        if event.to == BreakerState::Open || event.to == BreakerState::ForcedOpen {
            tracing::warn!(breaker = %event.breaker, from = %event.from, to = %event.to, "circuit breaker opened");
        } else {
            tracing::info!(breaker = %event.breaker, from = %event.from, to = %event.to, "circuit breaker state changed");
        }
        // No subscribers is fine.
        let _ = self.shared.events.send(event);
    }

    /// The current state (an expired open wait reads as half-open).
    pub fn state(&self) -> BreakerState {
        self.snapshot().state
    }

    /// State and window figures.
    pub fn snapshot(&self) -> BreakerSnapshot {
        let now = Instant::now();
        let mut core = self.shared.lock();
        let consecutive_failures = core.consecutive_failures;
        let trips = core.trips;
        let (state, stats, retry_after) = match &core.state {
            State::Open { until } if now >= *until => {
                (BreakerState::HalfOpen, Stats::default(), None)
            }
            State::Open { until } => (
                BreakerState::Open,
                Stats::default(),
                Some(until.saturating_duration_since(now)),
            ),
            State::HalfOpen { results, .. } => (BreakerState::HalfOpen, *results, None),
            State::Closed => {
                let stats = core.window.stats(now);
                (BreakerState::Closed, stats, None)
            }
            State::Disabled => (BreakerState::Disabled, Stats::default(), None),
            State::ForcedOpen => (BreakerState::ForcedOpen, Stats::default(), None),
        };
        BreakerSnapshot {
            name: self.shared.name.clone(),
            state,
            calls: stats.calls,
            failures: stats.failures,
            slow_calls: stats.slow,
            failure_rate: stats.failure_rate(),
            slow_call_rate: stats.slow_call_rate(),
            consecutive_failures,
            trips,
            retry_after_ms: retry_after.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        }
    }

    /// Switches the mode at runtime: `Auto` closes the breaker with an empty window.
    pub fn set_mode(&self, mode: Mode) {
        let now = Instant::now();
        let event = {
            let mut core = self.shared.lock();
            let to = match mode {
                Mode::Auto => {
                    core.trips = 0;
                    State::Closed
                }
                Mode::Disabled => State::Disabled,
                Mode::ForcedOpen => State::ForcedOpen,
            };
            self.transition(&mut core, to, now)
        };
        self.publish(event);
    }

    /// Transition events, from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<BreakerEvent> {
        self.shared.events.subscribe()
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Core> {
        self.core
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Permission to make one call. Record its outcome; dropping it unrecorded gives a
/// half-open trial slot back.
#[derive(Debug)]
pub struct Permit {
    breaker: Breaker,
    generation: u64,
    started: Instant,
    half_open: bool,
    /// Whether the outcome should be recorded at all (not for a disabled breaker).
    records: bool,
    done: bool,
}

impl Permit {
    fn new(
        breaker: &Breaker,
        generation: u64,
        started: Instant,
        half_open: bool,
        records: bool,
    ) -> Self {
        Self {
            breaker: breaker.clone(),
            generation,
            started,
            half_open,
            records,
            done: false,
        }
    }

    /// Records how the call went.
    pub fn record(mut self, outcome: Outcome) {
        self.done = true;
        if self.records {
            self.breaker.on_result(&self, outcome);
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.done && self.half_open {
            // A cancelled trial call: its slot goes back, its result is unknown.
            self.breaker.on_result(self, Outcome::Ignored);
        }
    }
}
