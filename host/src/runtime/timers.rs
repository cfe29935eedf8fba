//! Timers: messages an agent sends itself later (the WIT `timers`
//! interface, like Erlang's `erlang:send_after`).
//!
//! Invariants:
//! - Timers live in the instance's store data, so they die with the
//!   instance: a crashed or restarted agent has none (it re-arms in `init`).
//! - At most `max_timers` are pending per instance (0, the default, grants
//!   none); a delay is at most [`MAX_TIMER_DELAY`] and a message at most
//!   [`MAX_TIMER_MESSAGE_BYTES`], so a guest holds at most
//!   `max_timers × 64 KiB` of host memory in timers.
//! - A timer fires once: [`Timers::take_due`] removes it before its message
//!   is delivered. Delivery is the worker's job (`next_timer_due` and
//!   `take_due_timer` on the agent): the message goes through
//!   `handle-message` like any other, and the reply goes nowhere. The
//!   worker takes each timer under the agent's lock, behind the calls that
//!   wait for it, so timers that are always due cannot starve calls.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use tokio::time::Instant;

use super::bindings::terraphim::agent::timers::{self, TimerError};
use super::host::HostState;

/// Longest delay a timer may have: 30 days.
pub const MAX_TIMER_DELAY: Duration = Duration::from_secs(30 * 24 * 3600);

/// Largest message a timer may carry, in bytes.
pub const MAX_TIMER_MESSAGE_BYTES: usize = 64 << 10;

/// Most timers the `max_timers` limit may grant one agent.
pub const MAX_TIMERS_LIMIT: u32 = 10_000;

/// The pending timers of one instance.
#[derive(Debug)]
pub(crate) struct Timers {
    max: u32,
    next_id: u64,
    /// Pending timers by due time (then id, so that equal times keep the
    /// order they were set in).
    by_due: BTreeMap<(Instant, u64), String>,
    /// The due time of each pending timer, for `cancel`.
    due: HashMap<u64, Instant>,
}

impl Timers {
    pub fn new(max: u32) -> Self {
        Self {
            max,
            next_id: 1,
            by_due: BTreeMap::new(),
            due: HashMap::new(),
        }
    }

    /// Set a timer due `delay` after `now`; its id.
    pub fn schedule(
        &mut self,
        now: Instant,
        delay_ms: u64,
        message: String,
    ) -> Result<u64, TimerError> {
        if self.max == 0 {
            return Err(TimerError::NotGranted);
        }
        let delay = Duration::from_millis(delay_ms);
        if delay > MAX_TIMER_DELAY {
            return Err(TimerError::DelayTooLong(delay_ms));
        }
        if message.len() > MAX_TIMER_MESSAGE_BYTES {
            return Err(TimerError::MessageTooLarge(
                u32::try_from(message.len()).unwrap_or(u32::MAX),
            ));
        }
        if self.due.len() >= self.max as usize {
            return Err(TimerError::TooMany(self.max));
        }
        let id = self.next_id;
        self.next_id += 1;
        let at = now + delay;
        self.by_due.insert((at, id), message);
        self.due.insert(id, at);
        Ok(id)
    }

    /// Cancel timer `id`; whether it was pending.
    pub fn cancel(&mut self, id: u64) -> bool {
        match self.due.remove(&id) {
            Some(at) => self.by_due.remove(&(at, id)).is_some(),
            None => false,
        }
    }

    /// When the earliest pending timer is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.by_due.keys().next().map(|(at, _)| *at)
    }

    /// Remove and return the message of the earliest timer, if it is due at
    /// `now`.
    pub fn take_due(&mut self, now: Instant) -> Option<String> {
        let (&(at, id), _) = self.by_due.first_key_value()?;
        if at > now {
            return None;
        }
        self.due.remove(&id);
        self.by_due.remove(&(at, id))
    }

    /// How many timers are pending.
    pub fn pending(&self) -> usize {
        self.due.len()
    }
}

impl timers::Host for HostState {
    fn schedule(&mut self, delay_ms: u64, message: String) -> Result<u64, TimerError> {
        self.timers.schedule(Instant::now(), delay_ms, message)
    }

    fn cancel(&mut self, id: u64) -> bool {
        self.timers.cancel(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timers_fire_once_in_due_order_and_cancelled_ones_never() {
        let t = Instant::now();
        let mut timers = Timers::new(8);
        let late = timers.schedule(t, 20, "late".into()).unwrap();
        let early = timers.schedule(t, 10, "early".into()).unwrap();
        let cancelled = timers.schedule(t, 5, "cancelled".into()).unwrap();
        assert!(timers.cancel(cancelled));
        assert!(!timers.cancel(cancelled), "cancelled once");
        assert_eq!(timers.next_due(), Some(t + Duration::from_millis(10)));
        assert_eq!(timers.take_due(t + Duration::from_millis(9)), None);
        let at = t + Duration::from_millis(30);
        assert_eq!(timers.take_due(at).as_deref(), Some("early"));
        assert_eq!(timers.take_due(at).as_deref(), Some("late"));
        assert_eq!(timers.take_due(at), None, "each fires once");
        assert!(!timers.cancel(early) && !timers.cancel(late), "fired");
        assert_eq!(timers.pending(), 0);
    }

    #[test]
    fn timers_are_bounded() {
        let t = Instant::now();
        assert_eq!(
            Timers::new(0).schedule(t, 1, "x".into()),
            Err(TimerError::NotGranted)
        );
        let mut timers = Timers::new(2);
        timers.schedule(t, 1, "a".into()).unwrap();
        timers.schedule(t, 1, "b".into()).unwrap();
        assert_eq!(
            timers.schedule(t, 1, "c".into()),
            Err(TimerError::TooMany(2))
        );
        let mut timers = Timers::new(2);
        let too_long = MAX_TIMER_DELAY.as_millis() as u64 + 1;
        assert_eq!(
            timers.schedule(t, too_long, "x".into()),
            Err(TimerError::DelayTooLong(too_long))
        );
        let big = "x".repeat(MAX_TIMER_MESSAGE_BYTES + 1);
        assert!(matches!(
            timers.schedule(t, 1, big),
            Err(TimerError::MessageTooLarge(_))
        ));
        assert_eq!(timers.pending(), 0, "refusals set nothing");
    }
}
