//! Nebula Stream control plane.
