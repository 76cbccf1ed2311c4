//! When a watched input's changes are compiled and when they are enforced (the loader's
//! debounce).
//!
//! A change is enforced only once the inputs have been quiet for the debounce time: an editor
//! or `kubectl get > file` writes a file in several steps, and a half-written file must never be
//! enforced. Compiling need not wait for the quiet time, though: the first change after a quiet
//! period is compiled at once, and the result is held until the quiet time has passed since
//! that change, then applied; a change seen during the compile or while the result is held
//! discards it. The files were read after the last change, and no change came for the quiet
//! time after it, so the held result is what compiling at the end of the quiet time would give:
//! the guarantee of waiting first, with the compile inside the wait instead of after it. A
//! discarded compile falls back to waiting first (a burst of writes, `git checkout` of a
//! directory, is compiled once it settles, not once per write). The early compile starts
//! [`FIRST_QUIET`] after the change, not at once: one write of a file is several events
//! (truncating it, writing it), microseconds apart, and compiling after the first would
//! only be discarded.

use std::time::{Duration, Instant};

/// How long the inputs must be quiet before an early compile starts (or the whole quiet time,
/// when shorter).
pub const FIRST_QUIET: Duration = Duration::from_millis(2);

/// The debounce's state: changes seen, and whether a compile of the latest is held.
#[derive(Debug)]
pub struct Settle {
    quiet: Duration,
    /// The last change not yet enforced.
    last: Option<Instant>,
    /// Changes seen so far (a compile's token).
    changes: u64,
    /// The changes a held compile result reflects.
    compiled: Option<u64>,
    /// Whether the next compile may start before the quiet time ends.
    early: bool,
}

/// What the loop does next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Nothing to do.
    Idle,
    /// Wait for changes for at most this long, then ask again.
    Wait(Duration),
    /// Compile now (then [`Settle::compiled`] with the token [`Settle::token`] gave before).
    Compile,
    /// Apply the held result now (then [`Settle::applied`]).
    Apply,
}

impl Settle {
    pub fn new(quiet: Duration) -> Settle {
        Settle {
            quiet,
            last: None,
            changes: 0,
            compiled: None,
            early: true,
        }
    }

    /// A watched input changed at `now`. A held result no longer reflects the inputs, and the
    /// next compile waits for the quiet time.
    pub fn changed(&mut self, now: Instant) {
        if self.compiled.is_some() {
            self.early = false;
        }
        self.changes += 1;
        self.compiled = None;
        self.last = Some(now);
    }

    /// What to do at `now`.
    pub fn next(&self, now: Instant) -> Step {
        let Some(last) = self.last else {
            return Step::Idle;
        };
        let quiet_at = last + self.quiet;
        let compile_at = if self.early {
            last + FIRST_QUIET.min(self.quiet)
        } else {
            quiet_at
        };
        let until = |at: Instant, step: Step| match at.checked_duration_since(now) {
            Some(left) if !left.is_zero() => Step::Wait(left),
            _ => step,
        };
        match self.compiled {
            Some(c) if c == self.changes => until(quiet_at, Step::Apply),
            _ => until(compile_at, Step::Compile),
        }
    }

    /// Taken when a compile starts, given back to [`Self::compiled`] when it ends.
    pub fn token(&self) -> u64 {
        self.changes
    }

    /// The compile started with `token` ended (with changes seen meanwhile already passed to
    /// [`Self::changed`]): its result is held if nothing changed since it started.
    pub fn compiled(&mut self, token: u64) {
        if token == self.changes {
            self.compiled = Some(token);
        } else {
            self.early = false;
        }
    }

    /// The held result was applied: the changes are enforced, and the next change after this
    /// quiet period may be compiled at once.
    pub fn applied(&mut self) {
        self.last = None;
        self.compiled = None;
        self.early = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QUIET: Duration = Duration::from_millis(30);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A change is compiled at once and applied when the quiet time since it ends, not
    /// before; a compile that takes longer than the quiet time is applied as it ends.
    #[test]
    fn the_compile_overlaps_the_quiet_time() {
        let t0 = Instant::now();
        let mut s = Settle::new(QUIET);
        assert_eq!(s.next(t0), Step::Idle);
        s.changed(t0);
        assert_eq!(s.next(t0), Step::Wait(FIRST_QUIET));
        assert_eq!(s.next(t0 + FIRST_QUIET), Step::Compile);
        let token = s.token();
        s.compiled(token);
        assert_eq!(s.next(t0 + ms(10)), Step::Wait(ms(20)));
        assert_eq!(s.next(t0 + ms(30)), Step::Apply);
        s.applied();
        assert_eq!(s.next(t0 + ms(31)), Step::Idle);
        // A compile longer than the quiet time: applied at once.
        s.changed(t0 + ms(100));
        let token = s.token();
        s.compiled(token);
        assert_eq!(s.next(t0 + ms(160)), Step::Apply);
    }

    /// A change during the compile, or while its result is held, discards it; the inputs are
    /// then compiled only once quiet (never a result of files that changed after being read).
    #[test]
    fn a_change_meanwhile_discards_the_result_and_waits() {
        let t0 = Instant::now();
        let mut s = Settle::new(QUIET);
        s.changed(t0);
        s.changed(t0 + ms(1)); // the same write's second event: the early compile waits
        assert_eq!(s.next(t0 + ms(2)), Step::Wait(ms(1)));
        let token = s.token();
        s.changed(t0 + ms(5)); // during the compile
        s.compiled(token);
        assert_eq!(s.next(t0 + ms(20)), Step::Wait(ms(15)));
        assert_eq!(s.next(t0 + ms(35)), Step::Compile);
        let token = s.token();
        s.compiled(token);
        assert_eq!(s.next(t0 + ms(36)), Step::Apply);
        s.applied();
        // Held, then a change: discarded, and the next compile waits for the quiet time.
        s.changed(t0 + ms(100));
        let token = s.token();
        s.compiled(token);
        s.changed(t0 + ms(110));
        assert_eq!(s.next(t0 + ms(111)), Step::Wait(ms(29)));
        assert_eq!(s.next(t0 + ms(140)), Step::Compile);
    }

    /// A change seen late (stamped when the watcher saw it, received after a compile) counts
    /// from when it happened.
    #[test]
    fn quiet_time_counts_from_the_change() {
        let t0 = Instant::now();
        let mut s = Settle::new(QUIET);
        s.changed(t0);
        let token = s.token();
        s.changed(t0 + ms(3));
        s.compiled(token);
        // Received at +50 (after the compile), quiet since +33: compile again at once.
        assert_eq!(s.next(t0 + ms(50)), Step::Compile);
    }
}
