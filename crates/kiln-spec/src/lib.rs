//! `kiln.toml`: what users write, how it is checked, and the validated model.
pub mod model;
