//! Typed identifiers. A job id, a worker id and a fencing epoch are different things and
//! the compiler keeps them apart; on the wire and in the database they are strings
//! (UUIDs) and integers.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use uuid::Uuid;

/// An id string that is not a UUID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind}: {value:?} is not a uuid")]
pub struct ParseIdError {
    pub kind: &'static str,
    pub value: String,
}

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(Uuid);

        impl $name {
            /// A fresh random id.
            pub fn new() -> Self {
                Self(Uuid::new_v4())
            }
            pub fn as_uuid(&self) -> &Uuid {
                &self.0
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.hyphenated().fmt(f)
            }
        }

        impl FromStr for $name {
            type Err = ParseIdError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map(Self).map_err(|_| ParseIdError { kind: $kind, value: s.chars().take(64).collect() })
            }
        }

        impl From<Uuid> for $name {
            fn from(u: Uuid) -> Self {
                Self(u)
            }
        }
    };
}

uuid_id!(
    /// A job, from submission to its final state.
    JobId,
    "job id"
);
uuid_id!(
    /// One registration of a worker process (a restarted worker registers anew).
    WorkerId,
    "worker id"
);

/// Fencing token of a job's lease: grows by one for every dispatch of the job and is
/// persisted before the lease is handed out. A worker call carrying an older epoch is
/// stale and refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Epoch(pub u64);

impl Epoch {
    /// Before the first dispatch.
    pub const ZERO: Epoch = Epoch(0);

    pub fn next(self) -> Epoch {
        Epoch(self.0 + 1)
    }
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// One attempt at running a job: the job and its 1-based attempt number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AttemptId {
    pub job_id: JobId,
    pub attempt: u32,
}

impl fmt::Display for AttemptId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", self.job_id, self.attempt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_through_strings() {
        let j = JobId::new();
        assert_eq!(j.to_string().parse::<JobId>().unwrap(), j);
        let w = WorkerId::new();
        assert_eq!(w.to_string().parse::<WorkerId>().unwrap(), w);
        assert_ne!(JobId::new(), JobId::new());
    }

    #[test]
    fn bad_id_names_its_kind() {
        let e = "../etc".parse::<JobId>().unwrap_err();
        assert_eq!(e.to_string(), "invalid job id: \"../etc\" is not a uuid");
        let e = "".parse::<WorkerId>().unwrap_err();
        assert_eq!(e.kind, "worker id");
    }

    #[test]
    fn epochs_grow() {
        assert_eq!(Epoch::ZERO.next(), Epoch(1));
        assert!(Epoch(2) > Epoch(1));
    }
}
