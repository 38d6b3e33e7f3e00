//! `nebula control` (run the control plane) and `nebula admin …` (operate it).
//!
//! # Layout
//!
//! - `serve`: `nebula control`, its flags turned into the library's `Config`.
//! - `admin`: `nebula admin …`, calls of the `Admin` service and their output.

mod admin;
mod serve;
#[cfg(test)]
mod tests;

pub(crate) use admin::{AdminArgs, run_admin, state_name};
pub(crate) use serve::{ControlArgs, run_control};
