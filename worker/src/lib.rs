//! lorafleet worker library.
