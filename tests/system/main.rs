//! Whole-system tests: real clusters on loopback ports chosen at run time.
mod cli;
mod control;
mod daemon;
mod download;
mod hash;
mod observe;
mod replicas;
mod store;
mod store_checks;
mod support;
mod tls;
mod trust;
