//! lorafleet coordinator library.
