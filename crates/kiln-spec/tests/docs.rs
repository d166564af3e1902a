//! docs/spec.md stays true: its complete examples validate and it documents
//! every key the validator accepts.
//!
//! A ```` ```toml ```` block of docs/spec.md is a complete spec and must
//! validate; a ```` ```toml fragment ```` block shows part of one and is
//! only required to be TOML.

use std::path::Path;

fn spec_md() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/spec.md");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every fenced block with its info string and first line number.
fn blocks(md: &str) -> Vec<(String, usize, String)> {
    let mut out = Vec::new();
    let mut open: Option<(String, usize, String)> = None;
    for (i, line) in md.lines().enumerate() {
        match (&mut open, line.strip_prefix("```")) {
            (None, Some(info)) => open = Some((info.trim().to_owned(), i + 2, String::new())),
            (Some(_), Some("")) => out.extend(open.take()),
            (Some((_, _, body)), _) => {
                body.push_str(line);
                body.push('\n');
            }
            (None, None) => {}
        }
    }
    assert!(open.is_none(), "docs/spec.md has an unclosed code block");
    out
}

#[test]
fn complete_toml_blocks_validate_and_fragments_parse() {
    let md = spec_md();
    let mut complete = 0;
    for (info, line, body) in blocks(&md) {
        match info.as_str() {
            "toml" => {
                complete += 1;
                if let Err(e) = kiln_spec::parse(&body, &format!("docs/spec.md:{line}")) {
                    panic!("{e}");
                }
            }
            "toml fragment" => {
                // Several `deploy = …` lines show alternatives: parse each
                // line that starts a key on its own, then the whole block
                // when it has no repeated key.
                if let Err(e) = toml::from_str::<toml::Table>(&body) {
                    let alternatives = body
                        .lines()
                        .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
                        .all(|l| toml::from_str::<toml::Table>(l).is_ok());
                    assert!(alternatives, "docs/spec.md:{line}: not TOML: {e}");
                }
            }
            _ => {}
        }
    }
    assert!(
        complete >= 1,
        "docs/spec.md has no complete ```toml example"
    );
}

#[test]
fn every_key_the_validator_accepts_is_documented() {
    let md = spec_md();
    for (table, keys) in kiln_spec::schema::validator_keys() {
        for key in keys {
            assert!(
                md.contains(&format!("| `{key}` |")) || md.contains(&format!("## `[{key}")),
                "docs/spec.md does not document `{key}` of {table}"
            );
        }
    }
}
