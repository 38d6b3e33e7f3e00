//! The test kit (`nebula-testkit`), bound to the `nebula` binary under test.

pub(crate) use nebula_testkit::*;

/// The `nebula` binary under test.
pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_nebula");

/// A command running the `nebula` binary under test.
pub(crate) fn nebula() -> std::process::Command {
    std::process::Command::new(BIN)
}
