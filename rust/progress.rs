//! Progress counters and the cancel flag, shared between worker threads and whoever watches them.
//! Workers only touch atomics; the watcher (the Python binding's coordinating thread) reads them a few
//! times a second and sets `cancel` on Ctrl-C. Workers check it between chunks.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};

use crate::error::{Error, Result};

/// What a merge is doing: the stage that reports progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// Nothing started yet.
    Idle = 0,
    /// The analyze stage's pass (bytes read).
    Analyze = 1,
    /// The write stage (bytes written).
    Write = 2,
    /// Flushing to disk.
    Sync = 3,
}

impl Phase {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Analyze => "analyze",
            Phase::Write => "write",
            Phase::Sync => "sync",
        }
    }
}

/// Shared progress state.
#[derive(Debug, Default)]
pub struct Progress {
    phase: AtomicU8,
    done: AtomicU64,
    total: AtomicU64,
    cancel: AtomicBool,
    /// Bytes read from inputs, all phases.
    pub bytes_read: AtomicU64,
}

impl Progress {
    /// Starts a phase with `total` units of work.
    pub fn start(&self, phase: Phase, total: u64) {
        self.done.store(0, Ordering::Relaxed);
        self.total.store(total, Ordering::Relaxed);
        self.phase.store(phase as u8, Ordering::Release);
    }

    /// Records `n` units done.
    pub fn advance(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
    }

    /// (phase, done, total).
    pub fn snapshot(&self) -> (Phase, u64, u64) {
        let phase = match self.phase.load(Ordering::Acquire) {
            1 => Phase::Analyze,
            2 => Phase::Write,
            3 => Phase::Sync,
            _ => Phase::Idle,
        };
        (
            phase,
            self.done.load(Ordering::Relaxed),
            self.total.load(Ordering::Relaxed),
        )
    }

    /// Asks the work to stop at the next chunk boundary.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }

    /// `Err(Cancelled)` once cancel was asked.
    pub fn check(&self) -> Result<()> {
        if self.cancel.load(Ordering::Relaxed) {
            Err(Error::Cancelled)
        } else {
            Ok(())
        }
    }
}
