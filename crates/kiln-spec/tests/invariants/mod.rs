//! What must hold for *every* input of kiln-spec's parsers of untrusted text.
//!
//! One copy, used twice: by the cargo-fuzz targets (`fuzz/fuzz_targets/`,
//! through `#[path]`) and by `tests/fuzz_corpus.rs`, which replays the seed
//! corpus, `tests/bad/` and every example on the stable toolchain. So CI
//! checks on every run exactly what the fuzzer checks, without nightly.
//!
//! Each check panics with a message naming the input's problem; a panic is
//! what the fuzzer reports as a crash.

#![allow(dead_code)] // each user calls a subset

use std::collections::BTreeSet;
use std::ops::Range;

use kiln_spec::model::{HealthCheck, ImageSource, Strategy};
use kiln_spec::units::{parse_duration, parse_size};
use kiln_spec::{Diagnostics, Spec};

const FILE: &str = "fuzz/kiln.toml";

/// `kiln_spec::parse`: never panics, is deterministic, and either returns a
/// spec whose cross-references all hold, or diagnostics that can be shown.
pub fn spec_parse(text: &str) {
    let first = kiln_spec::parse(text, FILE);
    let again = kiln_spec::parse(text, FILE);
    assert!(first == again, "parse is not deterministic");
    match first {
        Ok(spec) => check_spec(&spec),
        Err(diags) => check_diagnostics(text, &diags),
    }
}

/// `parse_duration` and `parse_size`: never panic, are deterministic, and
/// whatever they accept prints back to the same value and is accepted in a
/// spec with the same meaning.
pub fn units(text: &str) {
    let duration = parse_duration(text);
    assert_eq!(
        duration,
        parse_duration(text),
        "parse_duration is not deterministic"
    );
    match &duration {
        Ok(d) => {
            assert_strict_unit_text(text);
            assert_eq!(
                parse_duration(&d.to_string()),
                Ok(*d),
                "duration {text:?} prints as {d}, which does not read back"
            );
            let spec = parse_ok(&format!(
                "[project]\nname = \"p\"\n[image.i]\n[service.s]\nimage = \"i\"\nstop_grace = \"{text}\"\n"
            ));
            assert_eq!(spec.services["s"].stop_grace, *d, "stop_grace = {text:?}");
        }
        Err(why) => assert!(!why.is_empty(), "empty error for duration {text:?}"),
    }

    let size = parse_size(text);
    assert_eq!(size, parse_size(text), "parse_size is not deterministic");
    match &size {
        Ok(s) => {
            assert_strict_unit_text(text);
            assert_eq!(
                parse_size(&s.to_string()),
                Ok(*s),
                "size {text:?} prints as {s}, which does not read back"
            );
            let source = format!(
                "[project]\nname = \"p\"\n[image.i]\n[service.s]\nimage = \"i\"\nresources = {{ memory = \"{text}\" }}\n"
            );
            // Below 4 MiB is refused on purpose; above, the spec keeps it.
            if s.bytes >= 4 << 20 {
                let spec = parse_ok(&source);
                assert_eq!(
                    spec.services["s"].resources.memory,
                    Some(*s),
                    "memory = {text:?}"
                );
            } else {
                assert!(
                    kiln_spec::parse(&source, FILE).is_err(),
                    "memory = {text:?} accepted"
                );
            }
        }
        Err(why) => assert!(!why.is_empty(), "empty error for size {text:?}"),
    }
}

/// What the parsers accept is plain ASCII digits and unit letters: no sign,
/// space, dot or anything a shell or a TOML string would treat specially.
fn assert_strict_unit_text(text: &str) {
    assert!(
        !text.is_empty() && text.bytes().all(|b| b.is_ascii_alphanumeric()),
        "{text:?} was accepted"
    );
}

fn parse_ok(source: &str) -> Spec {
    kiln_spec::parse(source, FILE).unwrap_or_else(|e| panic!("{source}\nwas refused:\n{e}"))
}

fn check_span(text: &str, span: &Range<usize>, what: &str) {
    assert!(
        span.start <= span.end && span.end <= text.len(),
        "{what}: span {span:?} is outside the source ({} bytes)",
        text.len()
    );
    assert!(
        text.is_char_boundary(span.start) && text.is_char_boundary(span.end),
        "{what}: span {span:?} splits a character"
    );
}

fn check_diagnostics(text: &str, diags: &Diagnostics) {
    assert_eq!(diags.file, FILE);
    assert_eq!(
        diags.source, text,
        "diagnostics must carry the source they point into"
    );
    assert!(!diags.items.is_empty(), "refused without saying why");
    for d in &diags.items {
        let what = format!("diagnostic `{}`", d.message);
        assert!(
            !d.message.trim().is_empty(),
            "a diagnostic without a message"
        );
        assert!(d.hint.is_some(), "{what} has no hint");
        check_span(text, &d.span, &what);
        if let Some((related, _)) = &d.related {
            check_span(text, related, &format!("{what} (related)"));
        }
        let (line, col) = diags.line_col(d.span.start);
        assert!(line >= 1 && col >= 1, "{what}: line/column {line}:{col}");
        diags.line_col(d.span.end);
    }
    let n = diags.items.len();
    let plain = diags.render(false);
    assert!(
        plain.ends_with(&format!(
            "error: {FILE} has {n} problem{}\n",
            if n == 1 { "" } else { "s" }
        )),
        "render(false) lost its summary line"
    );
    // Without colour, no escape sequence but those the source itself holds
    // (snippets and names are echoed verbatim).
    assert!(
        text.contains('\x1b') || !plain.contains('\x1b'),
        "render(false) contains ANSI escapes"
    );
    // render(true) is the same walk plus colour codes; skipping it halves
    // the cost of an input, which is mostly rendering.
}

/// What the planner and the engine rely on in a validated spec.
fn check_spec(spec: &Spec) {
    // The model is stored as JSON inside generations: it must read back.
    let json = serde_json::to_string(spec).expect("a spec serialises");
    let back: Spec = serde_json::from_str(&json).expect("a serialised spec reads back");
    assert!(back == *spec, "the spec changes through JSON");

    check_name(&spec.project.name);
    for (name, image) in &spec.images {
        check_name(name);
        if let ImageSource::Local(base) = &image.from {
            assert!(
                spec.images.contains_key(base),
                "image `{name}` from unknown `{base}`"
            );
        }
        if let Some(argv) = image.entrypoint.as_ref().or(image.cmd.as_ref()) {
            assert!(!argv.is_empty(), "image `{name}` has an empty argv");
        }
    }
    assert_no_image_cycle(spec);
    for name in spec.volumes.keys() {
        check_name(name);
    }

    for (name, svc) in &spec.services {
        check_name(name);
        match &svc.image {
            ImageSource::Scratch => panic!("service `{name}` runs scratch"),
            ImageSource::Local(image) => {
                assert!(
                    spec.images.contains_key(image),
                    "service `{name}`: unknown image `{image}`"
                )
            }
            _ => {}
        }
        assert!(
            svc.replicas <= 1000,
            "service `{name}`: {} replicas",
            svc.replicas
        );
        if let Some(command) = &svc.command {
            assert!(!command.is_empty(), "service `{name}` has an empty command");
        }
        for port in svc.ports.keys() {
            check_name(port);
        }
        for var in svc.env.keys().chain(svc.secrets.keys()) {
            assert!(
                var != "PORT" && !var.starts_with("PORT_") && !var.starts_with("KILN_"),
                "service `{name}` sets the reserved variable `{var}`"
            );
            assert!(!svc.secrets.contains_key(var) || !svc.env.contains_key(var));
        }
        for (path, mount) in &svc.volumes {
            assert!(
                path.starts_with('/'),
                "service `{name}`: mount point `{path}`"
            );
            assert!(
                spec.volumes.contains_key(&mount.volume),
                "service `{name}` mounts undeclared volume `{}`",
                mount.volume
            );
        }
        for path in svc.files.keys() {
            assert!(path.starts_with('/'), "service `{name}`: file `{path}`");
        }
        if let Some(health) = &svc.health {
            match &health.check {
                HealthCheck::Http { path, port } => {
                    assert!(
                        path.starts_with('/'),
                        "service `{name}`: health path `{path}`"
                    );
                    assert!(
                        svc.ports.contains_key(port),
                        "service `{name}`: health port `{port}`"
                    );
                }
                HealthCheck::Tcp { port } => {
                    assert!(
                        svc.ports.contains_key(port),
                        "service `{name}`: health port `{port}`"
                    );
                }
                HealthCheck::Exec { command } => assert!(!command.is_empty()),
            }
            assert!(
                health.interval.millis > 0
                    && health.timeout.millis > 0
                    && health.timeout <= health.interval,
                "service `{name}`: health timeout {} / interval {}",
                health.timeout,
                health.interval
            );
            assert!((1..=100).contains(&health.healthy) && (1..=100).contains(&health.unhealthy));
        }
        assert!(
            svc.deploy.deadline.millis > 0,
            "service `{name}`: zero deadline"
        );
        match &svc.deploy.strategy {
            Strategy::Rolling {
                max_surge,
                max_unavailable,
            } => assert!(
                max_surge + max_unavailable > 0,
                "service `{name}`: a rolling deploy that cannot progress"
            ),
            Strategy::Canary { steps, .. } => {
                assert!(
                    !steps.is_empty(),
                    "service `{name}`: a canary without steps"
                );
                assert!(
                    steps.windows(2).all(|w| w[0] < w[1])
                        && steps.iter().all(|s| (1..=99).contains(s)),
                    "service `{name}`: canary steps {steps:?}"
                );
            }
            Strategy::BlueGreen | Strategy::Recreate => {}
        }
        if let Some(m) = svc.resources.millicpus {
            assert!(
                (1..=1_024_000).contains(&m),
                "service `{name}`: {m} millicpus"
            );
        }
        if let Some(memory) = svc.resources.memory {
            assert!(memory.bytes >= 4 << 20, "service `{name}`: memory {memory}");
        }
    }

    for (vol, volume) in &spec.volumes {
        assert!(
            !(volume.shared && volume.exclusive),
            "volume `{vol}` is shared and exclusive"
        );
        let users: BTreeSet<&String> = spec
            .services
            .iter()
            .filter(|(_, s)| s.volumes.values().any(|m| &m.volume == vol))
            .map(|(n, _)| n)
            .collect();
        assert!(
            users.len() <= 1 || volume.shared,
            "volume `{vol}` is used by {users:?} without `shared`"
        );
        if volume.exclusive {
            // One writer at a time: what `recreate` with one replica gives.
            for (name, svc) in &spec.services {
                let writes = svc
                    .volumes
                    .values()
                    .any(|m| &m.volume == vol && !m.read_only);
                if writes {
                    assert!(
                        svc.replicas <= 1 && svc.deploy.strategy == Strategy::Recreate,
                        "service `{name}` writes exclusive volume `{vol}` with {} replicas and {}",
                        svc.replicas,
                        svc.deploy.strategy.name()
                    );
                }
            }
        }
    }

    let mut listens: Vec<std::net::SocketAddr> = Vec::new();
    for (name, route) in &spec.routes {
        check_name(name);
        let addr: std::net::SocketAddr = route
            .listen
            .parse()
            .unwrap_or_else(|_| panic!("route `{name}` listens on `{}`", route.listen));
        assert!(addr.port() != 0, "route `{name}` on port 0");
        // 0.0.0.0 / [::] take the port on every address.
        let overlap = listens.iter().find(|b| {
            b.port() == addr.port()
                && (b.ip() == addr.ip() || b.ip().is_unspecified() || addr.ip().is_unspecified())
        });
        assert!(
            overlap.is_none(),
            "routes on {addr} and {overlap:?} overlap"
        );
        listens.push(addr);
        let svc = spec
            .services
            .get(&route.service)
            .unwrap_or_else(|| panic!("route `{name}` to unknown `{}`", route.service));
        let port = svc
            .ports
            .get(&route.port)
            .unwrap_or_else(|| panic!("route `{name}` to unknown port `{}`", route.port));
        assert!(
            !(route.protocol == kiln_spec::model::Protocol::Http
                && port.protocol == kiln_spec::model::Protocol::Tcp),
            "route `{name}` speaks HTTP to a tcp port"
        );
    }
    for policy_key in &spec.policy.trusted_keys {
        assert!(!policy_key.is_empty() && !policy_key.starts_with('/'));
    }
}

fn check_name(name: &str) {
    assert!(
        !name.is_empty()
            && name.len() <= 63
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !name.starts_with('-'),
        "invalid name `{name}` was accepted"
    );
}

fn assert_no_image_cycle(spec: &Spec) {
    for start in spec.images.keys() {
        let mut current = start;
        for _ in 0..=spec.images.len() {
            match &spec.images[current].from {
                ImageSource::Local(next) => current = next,
                _ => break,
            }
            assert!(current != start, "image `{start}` is built from itself");
        }
    }
}
