//! Byte rates.
