//! The JSON Schema of kiln.toml (`kiln schema`) against the validator: each
//! schema table has exactly the keys the validator reads, every example spec
//! satisfies the schema, and an unknown key is refused by both.
//!
//! Why a small validator here and not the `jsonschema` crate: even with
//! `default-features = false` (no HTTP, no TLS), jsonschema 0.60 brings ~75
//! crates (num-bigint, fraction, parking_lot, ahash, two versions of syn…)
//! into the lock file to check a schema that uses a dozen keywords. The
//! subset schemars emits takes ~150 lines and `regex` (for `pattern`). It
//! refuses any keyword it does not implement, so a schemars upgrade that
//! starts emitting a new one fails this test instead of being ignored.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::Value;

fn schema() -> Value {
    serde_json::from_str(&kiln_spec::schema::json_schema()).expect("the schema is JSON")
}

/// The definition of a schema type: the root for `KilnToml`, else `$defs`.
fn definition<'s>(schema: &'s Value, name: &str) -> &'s Value {
    if name == "KilnToml" {
        assert_eq!(schema["title"], "KilnToml", "the root is not KilnToml");
        return schema;
    }
    schema["$defs"]
        .get(name)
        .unwrap_or_else(|| panic!("the schema has no definition `{name}`"))
}

fn property_names(def: &Value) -> BTreeSet<String> {
    def["properties"]
        .as_object()
        .map(|p| p.keys().cloned().collect())
        .unwrap_or_default()
}

#[test]
fn each_schema_table_has_exactly_the_keys_the_validator_reads() {
    let schema = schema();
    let keys = kiln_spec::schema::validator_keys();
    for (name, validator) in &keys {
        let def = definition(&schema, name);
        let validator: BTreeSet<String> = validator.iter().map(|k| k.to_string()).collect();
        let in_schema = property_names(def);
        assert_eq!(
            in_schema,
            validator,
            "`{name}`: only in the schema: {:?}; only in the validator: {:?}",
            in_schema.difference(&validator).collect::<Vec<_>>(),
            validator.difference(&in_schema).collect::<Vec<_>>(),
        );
        assert_eq!(
            def["additionalProperties"],
            Value::Bool(false),
            "`{name}` must refuse unknown keys, as the validator does"
        );
    }
    // And the other way round: no table of the schema escapes the check.
    let covered: BTreeSet<&str> = keys.iter().map(|(name, _)| *name).collect();
    for (name, def) in schema["$defs"].as_object().expect("the schema has $defs") {
        if def.get("properties").is_some() {
            assert!(
                covered.contains(name.as_str()),
                "schema table `{name}` is not in validator_keys()"
            );
        }
    }
}

#[test]
fn every_example_spec_satisfies_the_schema() {
    let schema = schema();
    let examples = example_specs();
    assert!(examples.len() >= 2, "example specs not found: {examples:?}");
    let mut specs: Vec<(PathBuf, String)> = examples
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            (p, text)
        })
        .collect();
    specs.extend(doc_examples());
    for (path, text) in specs {
        let value = toml_to_json(&text, &path);
        let errors = Validator::new(&schema).check(&value);
        assert!(
            errors.is_empty(),
            "{} does not satisfy the schema:\n{}",
            path.display(),
            errors.join("\n")
        );
    }
}

/// Editors must never flag a spec that kiln accepts: every seed of the fuzz
/// corpus that validates satisfies the schema too.
#[test]
fn every_spec_the_validator_accepts_satisfies_the_schema() {
    let schema = schema();
    let mut accepted = 0;
    for dir in ["fuzz/seeds/spec_parse", "fuzz/corpus/spec_parse"] {
        let Ok(entries) = std::fs::read_dir(root().join(dir)) else {
            continue;
        };
        for path in entries.flatten().map(|e| e.path()) {
            let text = String::from_utf8_lossy(&std::fs::read(&path).unwrap()).into_owned();
            if kiln_spec::parse(&text, "kiln.toml").is_err() {
                continue;
            }
            accepted += 1;
            let errors = Validator::new(&schema).check(&toml_to_json(&text, &path));
            assert!(
                errors.is_empty(),
                "{} is accepted by the validator but not by the schema:\n{}",
                path.display(),
                errors.join("\n")
            );
        }
    }
    eprintln!("{accepted} accepted specs checked against the schema");
    assert!(accepted > 0, "no seed of fuzz/seeds/spec_parse validates");
}

/// Every duration and size the parsers accept matches the schema's pattern
/// (the schema may be looser: it cannot see overflow).
fn assert_units_match_patterns(schema: &Value, text: &str) {
    for (def, accepted) in [
        ("Duration", kiln_spec::units::parse_duration(text).is_ok()),
        ("Size", kiln_spec::units::parse_size(text).is_ok()),
    ] {
        if accepted {
            let errors = Validator::new(schema).check_def(def, &Value::String(text.to_owned()));
            assert!(
                errors.is_empty(),
                "{def} {text:?} is accepted by kiln, not by the schema"
            );
        }
    }
}

#[test]
fn every_duration_and_size_kiln_accepts_matches_the_schema() {
    let schema = schema();
    for dir in ["fuzz/seeds/units", "fuzz/corpus/units"] {
        let Ok(entries) = std::fs::read_dir(root().join(dir)) else {
            continue;
        };
        for path in entries.flatten().map(|e| e.path()) {
            let text = String::from_utf8_lossy(&std::fs::read(&path).unwrap()).into_owned();
            assert_units_match_patterns(&schema, &text);
        }
    }
    let mut runner = proptest::test_runner::TestRunner::default();
    runner
        .run(&"([0-9]{1,3}(h|m|s|ms|B|KB|MiB|GiB|TiB|x)){1,4}", |text| {
            assert_units_match_patterns(&schema, &text);
            Ok(())
        })
        .unwrap();
}

#[test]
fn an_unknown_key_is_refused_by_the_schema_and_the_validator() {
    let schema = schema();
    let hello = std::fs::read_to_string(root().join("examples/hello/kiln.toml")).unwrap();
    let cases = [
        ("replica", hello.replace("replicas = 3", "replica = 3")),
        (
            "services",
            format!("{hello}\n[services.extra]\nimage = \"hello\"\n"),
        ),
        ("intervall", hello.replace("interval = ", "intervall = ")),
    ];
    for (key, text) in cases {
        assert!(
            kiln_spec::parse(&text, "kiln.toml").is_err(),
            "the validator accepts `{key}`"
        );
        let errors = Validator::new(&schema).check(&toml_to_json(&text, Path::new(key)));
        assert!(
            errors.iter().any(|e| e.contains(&format!("`{key}`"))),
            "the schema accepts `{key}`: {errors:?}"
        );
    }
}

#[test]
fn the_validator_of_this_file_is_not_vacuous() {
    let schema = schema();
    let check = |toml: &str| Validator::new(&schema).check(&toml_to_json(toml, Path::new("x")));
    assert!(check("[project]\nname = \"ok\"").is_empty());
    for bad in [
        "",                                                                              // required
        "[project]\nname = \"Not Valid\"",                                               // pattern
        "[project]\nname = 1",                                                           // type
        "[project]\nname = \"p\"\n[runtime]\ndriver = \"vm\"", // enum via anyOf/$ref
        "[project]\nname = \"p\"\n[service.s]\nimage = \"i\"\nreplicas = -1", // minimum
        "[project]\nname = \"p\"\n[image.i]\nexpose = [70000]", // maximum, items
        "[project]\nname = \"p\"\n[service.s]\nimage = \"i\"\nvolumes = { \"/d\" = 1 }", // anyOf
        "[project]\nname = \"p\"\n[service.s]\nimage = \"i\"\nstop_grace = \"1.5s\"", // pattern via $ref
    ] {
        assert!(!check(bad).is_empty(), "the schema accepts {bad:?}");
    }
}

/// The complete examples of docs/spec.md: its ```` ```toml ```` blocks
/// (`tests/docs.rs` checks that they validate).
fn doc_examples() -> Vec<(PathBuf, String)> {
    let path = root().join("docs/spec.md");
    let md = std::fs::read_to_string(&path).unwrap();
    let mut out = Vec::new();
    let mut block: Option<String> = None;
    for line in md.lines() {
        match (&mut block, line) {
            (None, "```toml") => block = Some(String::new()),
            (Some(_), "```") => out.push((path.clone(), block.take().unwrap_or_default())),
            (Some(b), _) => {
                b.push_str(line);
                b.push('\n');
            }
            (None, _) => {}
        }
    }
    assert!(
        !out.is_empty(),
        "docs/spec.md has no complete ```toml example"
    );
    out
}

fn toml_to_json(text: &str, path: &Path) -> Value {
    toml::from_str::<Value>(text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn example_specs() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for p in entries.flatten().map(|e| e.path()) {
            if p.is_dir() && p.file_name().is_some_and(|n| n != "target") {
                walk(&p, out);
            } else if p.file_name().is_some_and(|n| n == "kiln.toml") {
                out.push(p);
            }
        }
    }
    let mut found = Vec::new();
    for dir in ["examples", "docs"] {
        walk(&root().join(dir), &mut found);
    }
    found
}

/// A validator for the part of JSON Schema 2020-12 that schemars emits.
struct Validator<'s> {
    root: &'s Value,
}

/// Keywords that only annotate: they never make an instance invalid
/// (`format` is an annotation by default in 2020-12).
const ANNOTATIONS: &[&str] = &[
    "$schema",
    "$defs",
    "title",
    "description",
    "format",
    "default",
];

impl<'s> Validator<'s> {
    fn new(root: &'s Value) -> Self {
        Validator { root }
    }

    /// Every violation, each prefixed with its JSON pointer.
    fn check(&self, value: &Value) -> Vec<String> {
        let mut errors = Vec::new();
        self.validate(self.root, value, "", &mut errors);
        errors
    }

    /// Like [`Self::check`], against one definition of `$defs`.
    fn check_def(&self, def: &str, value: &Value) -> Vec<String> {
        let mut errors = Vec::new();
        self.validate(definition(self.root, def), value, "", &mut errors);
        errors
    }

    fn validate(&self, schema: &Value, value: &Value, at: &str, errors: &mut Vec<String>) {
        let schema = match schema {
            Value::Bool(true) => return,
            Value::Bool(false) => {
                errors.push(format!("{at}: not allowed here"));
                return;
            }
            Value::Object(o) => o,
            other => panic!("not a schema: {other}"),
        };
        for (keyword, arg) in schema {
            match keyword.as_str() {
                k if ANNOTATIONS.contains(&k) => {}
                "$ref" => {
                    let target = arg.as_str().expect("$ref is a string");
                    let pointer = target.strip_prefix('#').expect("only local $ref");
                    let target = self
                        .root
                        .pointer(pointer)
                        .unwrap_or_else(|| panic!("dangling $ref {pointer}"));
                    self.validate(target, value, at, errors);
                }
                "type" => {
                    let allowed: Vec<&str> = match arg {
                        Value::String(t) => vec![t.as_str()],
                        Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
                        other => panic!("bad type {other}"),
                    };
                    if !allowed.iter().any(|t| has_type(value, t)) {
                        errors.push(format!(
                            "{at}: expected {}, found {value}",
                            allowed.join(" or ")
                        ));
                    }
                }
                "enum" => {
                    let options = arg.as_array().expect("enum is an array");
                    if !options.contains(value) {
                        errors.push(format!("{at}: {value} is not one of {arg}"));
                    }
                }
                "const" => {
                    if value != arg {
                        errors.push(format!("{at}: {value} is not {arg}"));
                    }
                }
                "pattern" => {
                    if let Value::String(s) = value {
                        let re = regex::Regex::new(arg.as_str().expect("pattern is a string"))
                            .expect("the pattern compiles");
                        if !re.is_match(s) {
                            errors.push(format!("{at}: {s:?} does not match {arg}"));
                        }
                    }
                }
                "minimum" | "maximum" => {
                    if let (Some(n), Some(bound)) = (value.as_f64(), arg.as_f64()) {
                        let ok = if keyword == "minimum" {
                            n >= bound
                        } else {
                            n <= bound
                        };
                        if !ok {
                            errors.push(format!("{at}: {n} is beyond the {keyword} {bound}"));
                        }
                    }
                }
                "required" => {
                    if let Value::Object(o) = value {
                        for key in arg.as_array().expect("required is an array") {
                            let key = key.as_str().expect("required keys are strings");
                            if !o.contains_key(key) {
                                errors.push(format!("{at}: missing required key `{key}`"));
                            }
                        }
                    }
                }
                "properties" => {
                    if let Value::Object(o) = value {
                        for (key, sub) in arg.as_object().expect("properties is an object") {
                            if let Some(v) = o.get(key) {
                                self.validate(sub, v, &format!("{at}/{key}"), errors);
                            }
                        }
                    }
                }
                "additionalProperties" => {
                    if let Value::Object(o) = value {
                        let declared = schema.get("properties").and_then(Value::as_object);
                        for (key, v) in o {
                            if declared.is_some_and(|d| d.contains_key(key)) {
                                continue;
                            }
                            if *arg == Value::Bool(false) {
                                errors.push(format!("{at}: unknown key `{key}`"));
                            } else {
                                self.validate(arg, v, &format!("{at}/{key}"), errors);
                            }
                        }
                    }
                }
                "items" => {
                    if let Value::Array(items) = value {
                        for (i, v) in items.iter().enumerate() {
                            self.validate(arg, v, &format!("{at}/{i}"), errors);
                        }
                    }
                }
                "anyOf" | "oneOf" | "allOf" => {
                    let branches = arg.as_array().expect("a list of schemas");
                    let results: Vec<Vec<String>> = branches
                        .iter()
                        .map(|b| {
                            let mut e = Vec::new();
                            self.validate(b, value, at, &mut e);
                            e
                        })
                        .collect();
                    let passed = results.iter().filter(|e| e.is_empty()).count();
                    let ok = match keyword.as_str() {
                        "anyOf" => passed >= 1,
                        "oneOf" => passed == 1,
                        _ => passed == branches.len(),
                    };
                    if !ok {
                        errors.push(format!(
                            "{at}: fails {keyword} ({passed} of {} match)",
                            branches.len()
                        ));
                        // The closest branch says best what is wrong.
                        if let Some(e) = results.into_iter().min_by_key(Vec::len) {
                            errors.extend(e);
                        }
                    }
                }
                other => {
                    panic!("schema keyword `{other}` is not implemented by this test's validator")
                }
            }
        }
    }
}

fn has_type(value: &Value, t: &str) -> bool {
    match t {
        "null" => value.is_null(),
        "boolean" => value.is_boolean(),
        "string" => value.is_string(),
        "array" => value.is_array(),
        "object" => value.is_object(),
        "number" => value.is_number(),
        // 2020-12: any number with a zero fractional part is an integer.
        "integer" => {
            value.is_i64() || value.is_u64() || value.as_f64().is_some_and(|f| f.fract() == 0.0)
        }
        other => panic!("unknown type `{other}`"),
    }
}
