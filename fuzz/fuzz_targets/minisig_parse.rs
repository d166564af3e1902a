//! A `.minisig` file's bytes through kiln's signature verification (and the
//! same bytes as a public key): no panic, deterministic, and only a
//! well-formed signature by the fixed trusted key over the fixed manifest is
//! accepted (see the invariants module).
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../crates/kiln-image/tests/invariants_registry/mod.rs"]
mod invariants_registry;

fuzz_target!(|data: &[u8]| {
    invariants_registry::minisig_parse(data);
});
