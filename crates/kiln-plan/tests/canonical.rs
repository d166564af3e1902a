//! The generation hash depends on what a spec says, never on how the file
//! is laid out: tables, keys and inline-table entries in any order give the
//! same hash; changing any value changes it.

use kiln_plan::{Digest, Generation, Resolved};
use proptest::prelude::*;

/// Blocks of a spec; each block's lines after the header are keys of that
/// table, each a self-contained `key = value` line.
fn blocks() -> Vec<(&'static str, Vec<&'static str>)> {
    vec![
        ("[project]", vec!["name = \"shop\""]),
        (
            "[image.web]",
            vec![
                "copy = [{ src = \"bin/web\", dst = \"/app/web\" }]",
                "entrypoint = [\"/app/web\"]",
                "env = { B = \"2\", A = \"1\" }",
            ],
        ),
        (
            "[service.web]",
            vec![
                "image = \"web\"",
                "replicas = 3",
                "command = [\"/app/web\", \"--port\", \"${PORT}\"]",
                "env = { RUST_LOG = \"info\", DATABASE_URL = \"postgres://db/shop\" }",
                "files = { \"/etc/web.toml\" = \"config/web.toml\", \"/etc/b.toml\" = \"config/b.toml\" }",
                "secrets = { PGPASSWORD = { file = \".secrets/pg\" } }",
                "volumes = { \"/data\" = \"web-data\" }",
                "ports = { http = {}, admin = { protocol = \"http\" } }",
                "health = { port = \"http\", http = \"/healthz\", interval = \"1s\" }",
                "resources = { pids = 64, memory = \"64MiB\", cpus = 0.5 }",
            ],
        ),
        (
            "[service.worker]",
            vec!["image = \"web\"", "command = [\"/app/web\", \"work\"]"],
        ),
        ("[volume.web-data]", vec!["shared = false"]),
        (
            "[route.web]",
            vec![
                "listen = \"127.0.0.1:8080\"",
                "service = \"web\"",
                "port = \"http\"",
            ],
        ),
        ("[runtime]", vec!["driver = \"sandbox\""]),
    ]
}

fn render(order: &[usize], key_orders: &[Vec<usize>]) -> String {
    let blocks = blocks();
    let mut text = String::new();
    for &b in order {
        let (header, keys) = &blocks[b];
        text.push_str(header);
        text.push('\n');
        for &k in &key_orders[b] {
            text.push_str(keys[k]);
            text.push('\n');
        }
        text.push('\n');
    }
    text
}

fn resolved() -> Resolved {
    let d = |s: &str| Digest::of(s.as_bytes());
    let mut r = Resolved::default();
    r.images.insert("web".into(), d("image"));
    r.files.insert("config/web.toml".into(), d("web.toml"));
    r.files.insert("config/b.toml".into(), d("b.toml"));
    r.secrets.insert("file:.secrets/pg".into(), d("pg"));
    r
}

fn hash(text: &str) -> Digest {
    let spec = kiln_spec::parse(text, "kiln.toml").unwrap_or_else(|e| panic!("{e}\n{text}"));
    Generation::new(spec, resolved()).unwrap().content_hash()
}

fn identity_order() -> (Vec<usize>, Vec<Vec<usize>>) {
    let blocks = blocks();
    (
        (0..blocks.len()).collect(),
        blocks.iter().map(|(_, k)| (0..k.len()).collect()).collect(),
    )
}

fn shuffled_layout() -> impl Strategy<Value = (Vec<usize>, Vec<Vec<usize>>)> {
    let (order, keys) = identity_order();
    let key_orders: Vec<_> = keys.into_iter().map(|k| Just(k).prop_shuffle()).collect();
    (Just(order).prop_shuffle(), key_orders)
}

proptest! {
    #[test]
    fn layout_never_changes_the_hash((order, keys) in shuffled_layout()) {
        let (o0, k0) = identity_order();
        prop_assert_eq!(hash(&render(&order, &keys)), hash(&render(&o0, &k0)));
    }
}

/// Every value line of the spec, changed in turn, changes the hash. A
/// mutation that makes the spec invalid is counted, and most must stay valid,
/// so the test cannot pass by rejecting everything.
#[test]
fn any_changed_value_changes_the_hash() {
    let (order, keys) = identity_order();
    let base = render(&order, &keys);
    let base_hash = hash(&base);
    let (mut checked, mut total) = (0, 0);
    for (_, lines) in blocks().iter().skip(1) {
        for line in lines {
            total += 1;
            let changed = mutate(line);
            assert_ne!(&changed, line);
            let text = base.replace(line, &changed);
            let Ok(spec) = kiln_spec::parse(&text, "kiln.toml") else {
                continue;
            };
            let Ok(g) = Generation::new(spec, resolved()) else {
                continue;
            };
            assert_ne!(
                g.content_hash(),
                base_hash,
                "changing {line:?} to {changed:?}"
            );
            checked += 1;
        }
    }
    assert!(
        checked * 10 >= total * 8,
        "only {checked} of {total} mutations were valid specs"
    );
}

/// Changes one value of a `key = value` line.
fn mutate(line: &str) -> String {
    if let Some(pos) = line.find(|c: char| c.is_ascii_digit()) {
        let mut s = line.to_owned();
        let digit = s.as_bytes()[pos] - b'0';
        s.replace_range(pos..=pos, &((digit + 1) % 10).to_string());
        return s;
    }
    for (from, to) in [
        ("\"sandbox\"", "\"docker\""),
        ("false", "true"),
        ("\"info\"", "\"debug\""),
        ("\"web\"", "\"worker\""),
        ("PGPASSWORD", "PGPASS"),
        ("protocol = \"http\"", "protocol = \"tcp\""),
        ("\"http\"", "\"admin\""),
    ] {
        if line.contains(from) {
            return line.replacen(from, to, 1);
        }
    }
    line.replacen("\"/", "\"/x/", 1)
}

#[test]
fn the_identity_ignores_layout_too() {
    let (order, keys) = identity_order();
    let text = render(&order, &keys);
    let reversed: Vec<usize> = order.iter().rev().copied().collect();
    let rev_keys: Vec<Vec<usize>> = keys
        .iter()
        .map(|k| k.iter().rev().copied().collect())
        .collect();
    let a = Generation::new(kiln_spec::parse(&text, "a").unwrap(), resolved()).unwrap();
    let b = Generation::new(
        kiln_spec::parse(&render(&reversed, &rev_keys), "b").unwrap(),
        resolved(),
    )
    .unwrap();
    assert_eq!(
        a.instance_spec("web").identity(),
        b.instance_spec("web").identity()
    );
}
