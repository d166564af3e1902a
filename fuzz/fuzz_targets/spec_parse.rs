//! `kiln_spec::parse` on arbitrary text (bytes read as lossy UTF-8, as a
//! file would be by an editor): no panic, deterministic, every diagnostic
//! located inside the source on a character boundary and renderable, and
//! every accepted spec consistent (see the invariants module).
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../crates/kiln-spec/tests/invariants/mod.rs"]
mod invariants;

fuzz_target!(|data: &[u8]| {
    invariants::spec_parse(&String::from_utf8_lossy(data));
});
