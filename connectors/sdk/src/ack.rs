//! The acknowledgement contract between a source and its sinks.
//!
//! A source registers every batch it hands out with an [`AckTracker`] and
//! gets an [`Acker`] to travel with the batch. Each sink that takes the batch
//! holds a clone and must answer it: [`Acker::ack`] once the batch is
//! durable, [`Acker::fail`] when it never will be. A clone dropped without an
//! answer counts as a failure, so a bug or a panic in a sink can never be
//! mistaken for a delivery.
//!
//! The tracker resolves batches strictly in the order they were registered,
//! as a Postgres LSN or a Kafka offset must advance: the checkpoint moves to
//! the position of the newest batch below which every batch is delivered. A
//! failed batch stops the checkpoint where it is; the pipeline must then
//! restart from that checkpoint, and nothing after it is lost.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

/// The outcome of one batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    Delivered,
    Failed(String),
    /// Not delivered, but every holder that failed said a restart from the
    /// checkpoint may succeed (an outage outlasting a transaction).
    Retry(String),
}

/// Tells trackers apart, so a holder of batches can see a source restart.
static NEXT_TRACKER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

struct AckState {
    seq: u64,
    tracker: u64,
    failed: AtomicBool,
    /// Some holder failed the batch for good (or dropped it unanswered).
    definite: AtomicBool,
    reason: Mutex<Option<String>>,
    tx: mpsc::UnboundedSender<(u64, Delivery)>,
}

impl Drop for AckState {
    fn drop(&mut self) {
        let outcome = if self.failed.load(Ordering::Acquire) {
            let reason = self
                .reason
                .lock()
                .map(|r| r.clone())
                .unwrap_or(None)
                .unwrap_or_else(|| "a sink dropped the batch without acknowledging it".into());
            if self.definite.load(Ordering::Acquire) {
                Delivery::Failed(reason)
            } else {
                Delivery::Retry(reason)
            }
        } else {
            Delivery::Delivered
        };
        // The tracker may be gone at shutdown; nothing is confirmed then.
        let _ = self.tx.send((self.seq, outcome));
    }
}

/// One holder's obligation to answer for a batch. Clone it once per party
/// (sink, or record inside a sink) that must finish before the batch counts
/// as delivered.
pub struct Acker {
    state: Arc<AckState>,
    answered: bool,
}

impl Acker {
    /// This holder's part of the batch is durable.
    pub fn ack(mut self) {
        self.answered = true;
    }

    /// This holder's part of the batch will never be durable.
    pub fn fail(mut self, reason: impl Into<String>) {
        self.answered = true;
        self.mark_failed(reason.into());
    }

    /// This holder's part of the batch is not durable, but may be when the
    /// source replays it from its checkpoint (after [`crate::Sink::rewind`]).
    pub fn fail_transient(mut self, reason: impl Into<String>) {
        self.answered = true;
        if let Ok(mut r) = self.state.reason.lock() {
            r.get_or_insert(reason.into());
        }
        self.state.failed.store(true, Ordering::Release);
    }

    fn mark_failed(&self, reason: String) {
        if let Ok(mut r) = self.state.reason.lock() {
            r.get_or_insert(reason);
        }
        self.state.definite.store(true, Ordering::Release);
        self.state.failed.store(true, Ordering::Release);
    }

    /// The tracker's sequence number of this batch.
    pub fn sequence(&self) -> u64 {
        self.state.seq
    }

    /// Which tracker registered the batch: a new value means the source
    /// started over from its checkpoint.
    pub fn tracker(&self) -> u64 {
        self.state.tracker
    }

    /// Whether the tracker that registered the batch is gone: nobody waits
    /// for the answer, and the source will replay the batch from its
    /// checkpoint, so delivering it now would only duplicate it.
    pub fn is_orphaned(&self) -> bool {
        self.state.tx.is_closed()
    }
}

impl Clone for Acker {
    fn clone(&self) -> Self {
        Acker {
            state: Arc::clone(&self.state),
            answered: false,
        }
    }
}

impl Drop for Acker {
    fn drop(&mut self) {
        if !self.answered {
            self.mark_failed("a sink dropped the batch without acknowledging it".into());
        }
    }
}

impl std::fmt::Debug for Acker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acker")
            .field("seq", &self.state.seq)
            .finish()
    }
}

/// A batch that failed: the checkpoint cannot pass it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("batch {sequence} was not delivered: {reason}")]
pub struct AckFailure {
    pub sequence: u64,
    pub reason: String,
    /// Every sink that failed it said a replay from the checkpoint may
    /// succeed: the source restarts instead of stopping.
    pub transient: bool,
}

struct Pending<P> {
    position: Option<P>,
    outcome: Option<Delivery>,
    events: usize,
    bytes: usize,
}

/// Resolves acknowledgements in registration order into a checkpoint.
pub struct AckTracker<P> {
    id: u64,
    next_seq: u64,
    pending: BTreeMap<u64, Pending<P>>,
    tx: mpsc::UnboundedSender<(u64, Delivery)>,
    rx: mpsc::UnboundedReceiver<(u64, Delivery)>,
    checkpoint: Option<P>,
    in_flight_events: usize,
    in_flight_bytes: usize,
}

impl<P: Clone> Default for AckTracker<P> {
    fn default() -> Self {
        Self::new()
    }
}

impl<P: Clone> AckTracker<P> {
    pub fn new() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        AckTracker {
            id: NEXT_TRACKER.fetch_add(1, Ordering::Relaxed),
            next_seq: 0,
            pending: BTreeMap::new(),
            tx,
            rx,
            checkpoint: None,
            in_flight_events: 0,
            in_flight_bytes: 0,
        }
    }

    /// Registers a batch of `events` events. `position` is what the
    /// checkpoint may advance to once this batch and all before it are
    /// delivered; `None` for a batch that ends at no resumable point (the
    /// middle of a large transaction).
    pub fn register(&mut self, position: Option<P>, events: usize) -> Acker {
        self.register_sized(position, events, 0)
    }

    /// As [`Self::register`], counting `bytes` (the events'
    /// [`crate::ChangeEvent::approx_bytes`]) in [`Self::in_flight_bytes`]
    /// until the batch resolves.
    pub fn register_sized(&mut self, position: Option<P>, events: usize, bytes: usize) -> Acker {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.pending.insert(
            seq,
            Pending {
                position,
                outcome: None,
                events,
                bytes,
            },
        );
        self.in_flight_events += events;
        self.in_flight_bytes += bytes;
        Acker {
            state: Arc::new(AckState {
                seq,
                tracker: self.id,
                failed: AtomicBool::new(false),
                definite: AtomicBool::new(false),
                reason: Mutex::new(None),
                tx: self.tx.clone(),
            }),
            answered: false,
        }
    }

    /// Batches registered and not yet resolved into the checkpoint.
    pub fn in_flight_batches(&self) -> usize {
        self.pending.len()
    }

    /// Events in those batches.
    pub fn in_flight_events(&self) -> usize {
        self.in_flight_events
    }

    /// Bytes of those batches, as registered with [`Self::register_sized`].
    pub fn in_flight_bytes(&self) -> usize {
        self.in_flight_bytes
    }

    /// Every batch whose [`Acker::sequence`] is below this number is
    /// delivered. Lets a source record progress that is not a checkpoint
    /// position (a snapshot chunk) once the batch carrying it is durable.
    pub fn delivered_below(&self) -> u64 {
        self.pending
            .first_key_value()
            .map_or(self.next_seq, |(seq, _)| *seq)
    }

    /// The newest position below which everything is delivered.
    pub fn checkpoint(&self) -> Option<&P> {
        self.checkpoint.as_ref()
    }

    /// Applies every acknowledgement that has arrived, without waiting.
    /// Returns the new checkpoint if it moved.
    pub fn poll(&mut self) -> Result<Option<P>, AckFailure> {
        while let Ok((seq, outcome)) = self.rx.try_recv() {
            self.record(seq, outcome);
        }
        self.advance()
    }

    /// Waits for at least one acknowledgement, then behaves as [`Self::poll`].
    /// Pends forever when nothing is in flight, so it can sit in a `select!`.
    pub async fn next(&mut self) -> Result<Option<P>, AckFailure> {
        if self.pending.is_empty() {
            std::future::pending::<()>().await;
        }
        if let Some((seq, outcome)) = self.rx.recv().await {
            self.record(seq, outcome);
        }
        self.poll()
    }

    fn record(&mut self, seq: u64, outcome: Delivery) {
        if let Some(p) = self.pending.get_mut(&seq) {
            p.outcome = Some(outcome);
        }
    }

    fn advance(&mut self) -> Result<Option<P>, AckFailure> {
        let mut moved = None;
        while let Some(entry) = self.pending.first_entry() {
            match &entry.get().outcome {
                None => break,
                Some(Delivery::Failed(reason)) => {
                    return Err(AckFailure {
                        sequence: *entry.key(),
                        reason: reason.clone(),
                        transient: false,
                    });
                }
                Some(Delivery::Retry(reason)) => {
                    return Err(AckFailure {
                        sequence: *entry.key(),
                        reason: reason.clone(),
                        transient: true,
                    });
                }
                Some(Delivery::Delivered) => {
                    let p = entry.remove();
                    self.in_flight_events -= p.events;
                    self.in_flight_bytes -= p.bytes;
                    if let Some(pos) = p.position {
                        self.checkpoint = Some(pos.clone());
                        moved = Some(pos);
                    }
                }
            }
        }
        Ok(moved)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn checkpoint_advances_only_over_a_delivered_prefix() {
        let mut t: AckTracker<u64> = AckTracker::new();
        let a = t.register(Some(10), 1);
        let b = t.register(None, 5);
        let c = t.register(Some(30), 2);
        assert_eq!(t.in_flight_events(), 8);
        c.ack();
        assert_eq!(t.poll().unwrap(), None, "c is done but a and b are not");
        a.ack();
        assert_eq!(t.poll().unwrap(), Some(10));
        let b2 = b.clone();
        b.ack();
        assert_eq!(t.poll().unwrap(), None, "one holder of b has not answered");
        assert_eq!(t.delivered_below(), 1, "a is resolved, b is not");
        b2.ack();
        assert_eq!(t.next().await.unwrap(), Some(30));
        assert_eq!(t.delivered_below(), 3);
        assert_eq!(t.in_flight_batches(), 0);
        assert_eq!(t.in_flight_events(), 0);
    }

    #[test]
    fn bytes_are_counted_until_the_batch_resolves() {
        let mut t: AckTracker<u64> = AckTracker::new();
        let a = t.register_sized(Some(1), 2, 300_000);
        let b = t.register_sized(Some(2), 1, 40);
        assert_eq!(t.in_flight_bytes(), 300_040);
        b.ack();
        assert_eq!(t.poll().unwrap(), None);
        assert_eq!(t.in_flight_bytes(), 300_040, "b waits behind a");
        a.ack();
        assert_eq!(t.poll().unwrap(), Some(2));
        assert_eq!(t.in_flight_bytes(), 0);
    }

    #[test]
    fn dropping_unanswered_is_a_failure() {
        let mut t: AckTracker<u64> = AckTracker::new();
        let a = t.register(Some(1), 1);
        let a2 = a.clone();
        a.ack();
        drop(a2);
        let err = t.poll().unwrap_err();
        assert!(err.reason.contains("without acknowledging"), "{err}");
        assert_eq!(t.checkpoint(), None);
    }

    #[test]
    fn explicit_failure_keeps_its_reason() {
        let mut t: AckTracker<u64> = AckTracker::new();
        let a = t.register(Some(1), 1);
        a.fail("broker said: message too large");
        let err = t.poll().unwrap_err();
        assert_eq!(err.reason, "broker said: message too large");
    }
}

#[cfg(test)]
mod transient_tests {
    use super::*;

    #[tokio::test]
    async fn a_batch_failed_only_transiently_is_retryable_and_definite_wins() {
        let mut t: AckTracker<u64> = AckTracker::new();
        let a = t.register(Some(1), 1);
        let (a1, a2) = (a.clone(), a);
        a1.fail_transient("broker away");
        a2.ack();
        let e = t.next().await.unwrap_err();
        assert!(e.transient, "{e:?}");

        let mut t: AckTracker<u64> = AckTracker::new();
        let b = t.register(Some(1), 1);
        let (b1, b2) = (b.clone(), b);
        b1.fail_transient("broker away");
        b2.fail("refused for good");
        let e = t.next().await.unwrap_err();
        assert!(
            !e.transient,
            "one definite failure makes the batch definite"
        );
    }

    #[test]
    fn a_batch_of_a_dropped_tracker_is_orphaned() {
        let mut t: AckTracker<u64> = AckTracker::new();
        let a = t.register(Some(1), 1);
        let id = a.tracker();
        assert!(!a.is_orphaned());
        drop(t);
        assert!(a.is_orphaned());
        let t2: AckTracker<u64> = AckTracker::new();
        let mut t2 = t2;
        assert_ne!(t2.register(None, 0).tracker(), id);
        a.ack();
    }
}
