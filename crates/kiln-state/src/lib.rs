//! State store (SQLite).
