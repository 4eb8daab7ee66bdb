//! Types shared by every lorafleet crate: the job spec and its validation, typed ids,
//! the object-storage layout and errors. No networking, no async.

pub mod ids;
pub mod job;
pub mod spec;
#[cfg(feature = "testing")]
pub mod testing;
pub mod time;

pub use spec::{JobSpec, SpecContext, SpecError};
