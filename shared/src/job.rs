//! A job's lifecycle on the control plane, and the small domain types that the
//! coordinator and the worker share (failure classes). The object-key layout lives in
//! `lorafleet-storage` (`layout`).
//!
//! ```text
//!                 Cancel
//!        +------------------------------------------------+
//!        |                                                v
//!   [Queued] --Dispatch--> [Running] --Complete--> [Succeeded]
//!        ^                  |  |  |
//!        |  AttemptFailed   |  |  +--AttemptFailed{retry:false}--> [Failed]
//!        +--{retry:true}----+  |
//!                              | Cancel
//!                              v
//!                        [Cancelling] --Complete | AttemptFailed | WorkerStopped--> [Cancelled]
//!                         ^      |
//!                         +------+ Cancel (no-op)
//! ```
//!
//! * `Dispatch`: the coordinator persisted a new lease (epoch + 1) for a worker.
//! * `AttemptFailed { retry }`: the attempt ended without an adapter: the worker reported
//!   a failure, or the lease expired. `retry` is decided by the caller: the failure is
//!   retryable *and* attempts are left.
//! * `WorkerStopped`: the worker acknowledged a cancel (it no longer runs the job).
//! * `Succeeded`, `Failed` and `Cancelled` are final: nothing leaves them.
//!
//! There is no separate `leased` state: a job is `Running` from the moment its lease is
//! persisted, since the worker starts right after acquiring and the lease TTL covers a
//! worker that never starts.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelling,
    Cancelled,
}

/// What happened to a job; input of [`JobState::transition`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Dispatch,
    Complete,
    AttemptFailed { retry: bool },
    Cancel,
    WorkerStopped,
}

/// A transition that the state machine does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("illegal job transition: {transition:?} from {from}")]
pub struct IllegalTransition {
    pub from: JobState,
    pub transition: Transition,
}

impl JobState {
    pub const ALL: [JobState; 6] = [
        JobState::Queued,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelling,
        JobState::Cancelled,
    ];

    /// The state after `t`, or an error when `t` is not allowed from `self`.
    pub fn transition(self, t: Transition) -> Result<JobState, IllegalTransition> {
        use JobState::*;
        use Transition::*;
        let next = match (self, t) {
            (Queued, Dispatch) => Running,
            (Queued, Cancel) => Cancelled,
            (Running, Complete) => Succeeded,
            (Running, AttemptFailed { retry: true }) => Queued,
            (Running, AttemptFailed { retry: false }) => Failed,
            (Running, Cancel) => Cancelling,
            (Cancelling, Complete | AttemptFailed { .. } | WorkerStopped) => Cancelled,
            (Cancelling, Cancel) => Cancelling,
            _ => return Err(IllegalTransition { from: self, transition: t }),
        };
        Ok(next)
    }

    /// Nothing leaves a final state.
    pub fn is_final(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed | JobState::Cancelled)
    }

    /// A worker holds a lease on the job (it is running or being stopped).
    pub fn has_lease(self) -> bool {
        matches!(self, JobState::Running | JobState::Cancelling)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelling => "cancelling",
            JobState::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown job state {0:?}")]
pub struct ParseStateError(pub String);

impl FromStr for JobState {
    type Err = ParseStateError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobState::ALL.into_iter().find(|st| st.as_str() == s).ok_or_else(|| ParseStateError(s.chars().take(32).collect()))
    }
}

/// How a failed attempt is classified on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureClass {
    /// Worth another attempt (crash, lost lease, transient storage error).
    Retryable,
    /// Will fail again (bad data, missing model): the job fails at once.
    NonRetryable,
}

impl FailureClass {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureClass::Retryable => "retryable",
            FailureClass::NonRetryable => "non_retryable",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::JobState::*;
    use super::Transition::*;
    use super::*;

    /// One `#[test]` per (state, transition) pair: `Some(next)` when legal, `None` when
    /// the transition must be refused.
    macro_rules! transition_tests {
        ($($name:ident: $from:expr, $t:expr => $expect:expr;)*) => {
            $(
                #[test]
                fn $name() {
                    let got = $from.transition($t);
                    let expect: Option<JobState> = $expect;
                    match expect {
                        Some(next) => assert_eq!(got, Ok(next)),
                        None => assert_eq!(got, Err(IllegalTransition { from: $from, transition: $t })),
                    }
                }
            )*
            /// The table above lists every pair exactly once.
            #[test]
            fn table_covers_every_pair() {
                let listed: Vec<(JobState, Transition)> = vec![$(($from, $t)),*];
                let all_t = [Dispatch, Complete, AttemptFailed { retry: true }, AttemptFailed { retry: false }, Cancel, WorkerStopped];
                for s in JobState::ALL {
                    for t in all_t {
                        assert_eq!(listed.iter().filter(|p| **p == (s, t)).count(), 1, "{s:?} {t:?}");
                    }
                }
                assert_eq!(listed.len(), JobState::ALL.len() * all_t.len());
            }
        };
    }

    transition_tests! {
        queued_dispatch: Queued, Dispatch => Some(Running);
        queued_complete: Queued, Complete => None;
        queued_fail_retry: Queued, AttemptFailed { retry: true } => None;
        queued_fail_final: Queued, AttemptFailed { retry: false } => None;
        queued_cancel: Queued, Cancel => Some(Cancelled);
        queued_worker_stopped: Queued, WorkerStopped => None;

        running_dispatch: Running, Dispatch => None;
        running_complete: Running, Complete => Some(Succeeded);
        running_fail_retry: Running, AttemptFailed { retry: true } => Some(Queued);
        running_fail_final: Running, AttemptFailed { retry: false } => Some(Failed);
        running_cancel: Running, Cancel => Some(Cancelling);
        running_worker_stopped: Running, WorkerStopped => None;

        succeeded_dispatch: Succeeded, Dispatch => None;
        succeeded_complete: Succeeded, Complete => None;
        succeeded_fail_retry: Succeeded, AttemptFailed { retry: true } => None;
        succeeded_fail_final: Succeeded, AttemptFailed { retry: false } => None;
        succeeded_cancel: Succeeded, Cancel => None;
        succeeded_worker_stopped: Succeeded, WorkerStopped => None;

        failed_dispatch: Failed, Dispatch => None;
        failed_complete: Failed, Complete => None;
        failed_fail_retry: Failed, AttemptFailed { retry: true } => None;
        failed_fail_final: Failed, AttemptFailed { retry: false } => None;
        failed_cancel: Failed, Cancel => None;
        failed_worker_stopped: Failed, WorkerStopped => None;

        cancelling_dispatch: Cancelling, Dispatch => None;
        cancelling_complete: Cancelling, Complete => Some(Cancelled);
        cancelling_fail_retry: Cancelling, AttemptFailed { retry: true } => Some(Cancelled);
        cancelling_fail_final: Cancelling, AttemptFailed { retry: false } => Some(Cancelled);
        cancelling_cancel: Cancelling, Cancel => Some(Cancelling);
        cancelling_worker_stopped: Cancelling, WorkerStopped => Some(Cancelled);

        cancelled_dispatch: Cancelled, Dispatch => None;
        cancelled_complete: Cancelled, Complete => None;
        cancelled_fail_retry: Cancelled, AttemptFailed { retry: true } => None;
        cancelled_fail_final: Cancelled, AttemptFailed { retry: false } => None;
        cancelled_cancel: Cancelled, Cancel => None;
        cancelled_worker_stopped: Cancelled, WorkerStopped => None;
    }

    #[test]
    fn final_states_and_leases() {
        let finals: Vec<_> = JobState::ALL.into_iter().filter(|s| s.is_final()).collect();
        assert_eq!(finals, [Succeeded, Failed, Cancelled]);
        let leased: Vec<_> = JobState::ALL.into_iter().filter(|s| s.has_lease()).collect();
        assert_eq!(leased, [Running, Cancelling]);
    }

    #[test]
    fn state_names_round_trip() {
        for s in JobState::ALL {
            assert_eq!(s.as_str().parse::<JobState>().unwrap(), s);
        }
        assert!("leased".parse::<JobState>().is_err());
    }
}
