//! Whole-system tests: real clusters on loopback ports chosen at run time.
mod cli;
mod control;
mod daemon;
mod download;
mod hash;
mod lifecycle;
mod mirror;
mod observe;
mod origin;
mod redis_state;
mod replicas;
mod store;
mod store_checks;
mod support;
mod tls;
mod trust;
