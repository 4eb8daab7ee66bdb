//! lorafleet gRPC API (`package lorafleet.v1`): the generated prost messages and tonic
//! clients/servers for `JobService` and `WorkerService`, plus the encoded file
//! descriptor set that the coordinator serves through gRPC reflection, and the
//! conversions to and from the domain types ([`convert`]).
//!
//! The source of truth is `proto/lorafleet/v1/lorafleet.proto`; read its comments for
//! the semantics of each call (fencing epochs, long polls, streaming layouts).

pub mod v1 {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("lorafleet.v1");
}

/// Encoded `FileDescriptorSet` of `lorafleet.v1`, for `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("lorafleet_v1_descriptor");

pub mod connect;
pub mod convert;

pub use v1::*;

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn descriptor_set_names_every_service() {
        let set = prost_types::FileDescriptorSet::decode(FILE_DESCRIPTOR_SET).unwrap();
        let file = set.file.iter().find(|f| f.package() == "lorafleet.v1").unwrap();
        let services: Vec<_> = file.service.iter().map(|s| s.name()).collect();
        assert_eq!(services, ["JobService", "WorkerService", "AdminService"]);
    }

    #[test]
    fn enum_prefixes_are_stripped() {
        assert_eq!(JobState::Queued as i32, 1);
        assert_eq!(JobState::from_str_name("JOB_STATE_CANCELLING"), Some(JobState::Cancelling));
        assert_eq!(FailureClass::NonRetryable.as_str_name(), "FAILURE_CLASS_NON_RETRYABLE");
    }
}
