//! What a machine's owner can still learn about a machine it judged failed: whether a vCPU it
//! gave up waiting for answered after all, and whether the guest beat again. Either proves
//! the guest was alive at the verdict (the verdict was false), which the owner reports.
//!
//! A [`Witness`] is a small cloneable handle, independent of the machine's lifetime: it can
//! be kept after the machine is handed to another thread or torn down. Read by the owner's
//! thread; written by the machine (the pause that gave up, the heartbeat device).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::{Arc, Mutex};

/// The answers to pauses a machine gave up waiting for: (vCPU, where its answer will come).
pub(crate) type Unanswered = Arc<Mutex<Vec<(u8, Receiver<()>)>>>;

/// What proves a verdict false, found by [`Witness::evidence`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Evidence {
    /// This vCPU answered a pause that had been given up on.
    Answered(u8),
    /// The guest beat again: its heartbeat count went past the one at the verdict; the
    /// sequence number of its last beat.
    Beat(u32),
}

impl std::fmt::Display for Evidence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Evidence::Answered(vcpu) => write!(f, "vCPU {vcpu} answered after it was given up on"),
            Evidence::Beat(sequence) => {
                write!(f, "heartbeat {sequence} arrived after the verdict")
            }
        }
    }
}

/// A handle on one machine's late signs of life.
#[derive(Clone)]
pub struct Witness {
    unanswered: Unanswered,
    count: Arc<AtomicU64>,
    last_sequence: Arc<AtomicU32>,
    /// The heartbeat count at the verdict.
    beats_at_verdict: u64,
}

impl Witness {
    pub(crate) fn new(
        unanswered: Unanswered,
        (count, last_sequence): (Arc<AtomicU64>, Arc<AtomicU32>),
    ) -> Self {
        let beats_at_verdict = count.load(Ordering::Acquire);
        Witness {
            unanswered,
            count,
            last_sequence,
            beats_at_verdict,
        }
    }

    /// The heartbeats as they were at the verdict (when this witness was taken).
    pub fn beats_at_verdict(&self) -> u64 {
        self.beats_at_verdict
    }

    /// A sign of life since the verdict, if there is one yet. Never blocks.
    pub fn evidence(&self) -> Option<Evidence> {
        let mut answered = None;
        self.unanswered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(vcpu, answer)| match answer.try_recv() {
                Ok(()) => {
                    answered.get_or_insert(*vcpu);
                    false
                }
                Err(TryRecvError::Empty) => true,
                // The thread ended without answering: no sign of life, and none to come.
                Err(TryRecvError::Disconnected) => false,
            });
        if let Some(vcpu) = answered {
            return Some(Evidence::Answered(vcpu));
        }
        let count = self.count.load(Ordering::Acquire);
        (count > self.beats_at_verdict)
            .then(|| Evidence::Beat(self.last_sequence.load(Ordering::Relaxed)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counters() -> (Arc<AtomicU64>, Arc<AtomicU32>) {
        (Arc::new(AtomicU64::new(40)), Arc::new(AtomicU32::new(39)))
    }

    #[test]
    fn a_pause_answered_after_it_was_given_up_on_disproves_the_verdict() {
        let unanswered = Unanswered::default();
        let (ack, answer) = std::sync::mpsc::channel();
        unanswered.lock().unwrap().push((1, answer));
        let witness = Witness::new(unanswered, counters());
        assert_eq!(witness.evidence(), None, "no answer yet");
        ack.send(()).unwrap();
        assert_eq!(witness.evidence(), Some(Evidence::Answered(1)));
        assert_eq!(witness.evidence(), None, "reported once");
    }

    #[test]
    fn a_thread_that_ended_without_answering_disproves_nothing() {
        let unanswered = Unanswered::default();
        let (ack, answer) = std::sync::mpsc::channel::<()>();
        unanswered.lock().unwrap().push((0, answer));
        let witness = Witness::new(unanswered, counters());
        drop(ack);
        assert_eq!(witness.evidence(), None);
    }

    #[test]
    fn a_heartbeat_after_the_verdict_disproves_it() {
        let (count, sequence) = counters();
        let witness = Witness::new(Unanswered::default(), (count.clone(), sequence.clone()));
        assert_eq!(witness.beats_at_verdict(), 40);
        assert_eq!(witness.evidence(), None);
        sequence.store(40, Ordering::Relaxed);
        count.store(41, Ordering::Release);
        assert_eq!(witness.evidence(), Some(Evidence::Beat(40)));
        assert_eq!(
            Evidence::Beat(40).to_string(),
            "heartbeat 40 arrived after the verdict"
        );
    }
}
