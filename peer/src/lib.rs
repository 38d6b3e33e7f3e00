//! Nebula Stream peer daemon.
