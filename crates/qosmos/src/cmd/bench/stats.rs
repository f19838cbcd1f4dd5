//! Counters shared by every connection task, read once a second for progress.

use std::sync::atomic::AtomicU64;

/// Running totals; each task adds in batches.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// PUBLISH packets written by publishers.
    pub(crate) sent: AtomicU64,
    /// QoS 1/2 exchanges completed by publishers.
    pub(crate) acked: AtomicU64,
    /// PUBLISH packets received by subscribers (duplicates included).
    pub(crate) received: AtomicU64,
    /// Distinct (publisher, seq) per subscriber received.
    pub(crate) distinct: AtomicU64,
    /// Publishers that have finished (or failed).
    pub(crate) publishers_done: AtomicU64,
}
