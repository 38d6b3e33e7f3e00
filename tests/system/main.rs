//! Whole-system tests: real clusters on loopback ports chosen at run time.
mod support;
mod control;
