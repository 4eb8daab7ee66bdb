//! lorafleet gRPC API.
