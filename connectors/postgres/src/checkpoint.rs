//! The LSN checkpoint: the one position walcast ever confirms to Postgres.
//!
//! # The invariant
//!
//! The flush LSN sent in standby status updates becomes the slot's
//! `confirmed_flush_lsn`. Postgres may then recycle WAL before it and will
//! never send a transaction that committed before it again. So it may only
//! reach the end of a commit record once *every* event of that transaction,
//! and of every transaction before it, has been acknowledged by *every*
//! sink. [`walcast_sdk::AckTracker`] enforces the ordering; this module adds
//! the two Postgres-specific rules:
//!
//! * It never moves backwards. A stale acknowledgement after a reconnect, or
//!   a keepalive from a lagging server, cannot lower it.
//! * An idle slot must not pin WAL. When nothing is in flight and no
//!   transaction is open, everything up to the WAL end reported by the
//!   server has either been delivered or was never ours to deliver (changes
//!   to tables outside the publication), so the checkpoint may jump there.
//!   Without this, heavy writes to uncaptured tables would fill the disk.
//!
//! Crash anywhere and restart from the slot: what is replayed begins after
//! the last confirmed commit, so nothing is lost and duplicates are bounded
//! by what was in flight.

use walcast_sdk::ack::AckFailure;
use walcast_sdk::{AckTracker, Acker, Lsn};

pub struct LsnCheckpoint {
    tracker: AckTracker<Lsn>,
    confirmed: Lsn,
}

impl LsnCheckpoint {
    /// Starts from the slot's confirmed_flush_lsn.
    pub fn new(start: Lsn) -> Self {
        LsnCheckpoint {
            tracker: AckTracker::new(),
            confirmed: start,
        }
    }

    /// The position to confirm to Postgres now.
    pub fn confirmed(&self) -> Lsn {
        self.confirmed
    }

    /// Registers a batch. `commit_end` is the end LSN of the last commit the
    /// batch completes, or `None` for a slice of a transaction still open.
    pub fn register(&mut self, commit_end: Option<Lsn>, events: usize) -> Acker {
        self.tracker.register(commit_end, events)
    }

    /// As [`Self::register`], counting the batch's bytes (see
    /// [`walcast_sdk::ChangeEvent::approx_bytes`]) until it resolves.
    pub fn register_sized(
        &mut self,
        commit_end: Option<Lsn>,
        events: usize,
        bytes: usize,
    ) -> Acker {
        self.tracker.register_sized(commit_end, events, bytes)
    }

    pub fn in_flight_events(&self) -> usize {
        self.tracker.in_flight_events()
    }

    pub fn in_flight_bytes(&self) -> usize {
        self.tracker.in_flight_bytes()
    }

    /// Every batch with a lower [`Acker::sequence`] was delivered.
    pub fn delivered_below(&self) -> u64 {
        self.tracker.delivered_below()
    }

    pub fn in_flight_batches(&self) -> usize {
        self.tracker.in_flight_batches()
    }

    fn raise(&mut self, to: Lsn) -> bool {
        if to > self.confirmed {
            self.confirmed = to;
            true
        } else {
            false
        }
    }

    /// Waits for acknowledgements; returns whether the checkpoint moved.
    pub async fn next_ack(&mut self) -> Result<bool, AckFailure> {
        let moved = self.tracker.next().await?;
        Ok(moved.is_some_and(|lsn| self.raise(lsn)))
    }

    /// Applies acknowledgements that already arrived, without waiting.
    #[cfg(test)]
    pub fn poll(&mut self) -> Result<bool, AckFailure> {
        let moved = self.tracker.poll()?;
        Ok(moved.is_some_and(|lsn| self.raise(lsn)))
    }

    /// The server reported its WAL end (keepalive or XLogData header).
    /// Moves the checkpoint there if nothing of ours is pending.
    pub fn on_wal_end(&mut self, wal_end: Lsn, in_transaction: bool) -> bool {
        if !in_transaction && self.tracker.in_flight_batches() == 0 {
            self.raise(wal_end)
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_wal_end_moves_only_when_nothing_is_pending() {
        let mut c = LsnCheckpoint::new(Lsn(100));
        assert!(c.on_wal_end(Lsn(200), false));
        assert_eq!(c.confirmed(), Lsn(200));
        assert!(!c.on_wal_end(Lsn(150), false), "never backwards");
        assert!(
            !c.on_wal_end(Lsn(300), true),
            "not inside an open transaction"
        );
        let a = c.register(Some(Lsn(250)), 3);
        assert!(
            !c.on_wal_end(Lsn(400), false),
            "not while a batch is in flight"
        );
        a.ack();
        assert!(c.poll().unwrap());
        assert_eq!(c.confirmed(), Lsn(250));
        assert!(c.on_wal_end(Lsn(400), false));
        assert_eq!(c.confirmed(), Lsn(400));
    }

    #[test]
    fn a_failed_batch_holds_the_checkpoint() {
        let mut c = LsnCheckpoint::new(Lsn(10));
        let a = c.register(Some(Lsn(20)), 1);
        let b = c.register(Some(Lsn(30)), 1);
        b.ack();
        a.fail("broker refused");
        assert!(c.poll().is_err());
        assert_eq!(c.confirmed(), Lsn(10));
    }
}
