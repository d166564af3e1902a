//! Bugs found in the validator, each pinned by the smallest spec that showed
//! it.

fn service(extra: &str) -> String {
    format!("[project]\nname = \"p\"\n\n[image.app]\n\n[service.web]\nimage = \"app\"\n{extra}\n")
}

fn messages(source: &str) -> Vec<String> {
    match kiln_spec::parse(source, "kiln.toml") {
        Ok(_) => Vec::new(),
        Err(d) => d.items.into_iter().map(|d| d.message).collect(),
    }
}

/// `cpus = 0x10` was read as the decimal digits "10": ten CPUs, not sixteen.
#[test]
fn cpus_written_in_hex_octal_or_binary_keep_their_value() {
    for (cpus, millicpus) in [
        ("0x10", 16_000),
        ("0o10", 8_000),
        ("0b11", 3_000),
        ("1_0", 10_000),
    ] {
        let source = service(&format!("resources = {{ cpus = {cpus} }}"));
        let spec = kiln_spec::parse(&source, "kiln.toml").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            spec.services["web"].resources.millicpus,
            Some(millicpus),
            "cpus = {cpus}"
        );
    }
}

/// An integer too large for the reader must be refused, not dropped.
#[test]
fn cpus_too_large_to_read_is_refused() {
    for cpus in [
        "0x7fffffffffffffff",
        "0xffffffffffffffff",
        "99999999999999999999",
    ] {
        let source = service(&format!("resources = {{ cpus = {cpus} }}"));
        let messages = messages(&source);
        assert!(!messages.is_empty(), "cpus = {cpus} was accepted");
    }
}

/// `env` refused PORT, PORT_<NAME> and KILN_*, but `secrets` let the same
/// names through, overriding what kiln sets.
#[test]
fn secrets_cannot_take_the_names_kiln_sets() {
    for var in [
        "PORT",
        "PORT_HTTP",
        "KILN_SERVICE",
        "KILN_INSTANCE",
        "KILN_GENERATION",
    ] {
        let source = service(&format!(
            "ports = {{ http = {{}} }}\nsecrets = {{ {var} = {{ env = \"X\" }} }}"
        ));
        let messages = messages(&source);
        assert_eq!(
            messages,
            vec![format!("`{var}` is set by kiln and cannot be overridden")],
            "secret {var}"
        );
    }
}
