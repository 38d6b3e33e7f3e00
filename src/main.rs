//! The `nebula` command.
fn main() {}
