//! Arbitrary bytes as a request's host and the host patterns of a
//! listener's routes: no panic, and the proxy's matcher agrees with the
//! plain reading of the rules (see the invariants module).
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../crates/kiln-proxy/tests/invariants_host/mod.rs"]
mod invariants_host;

fuzz_target!(|data: &[u8]| {
    invariants_host::host_match(data);
});
