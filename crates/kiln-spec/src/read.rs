//! A typed, error-collecting reader over the spanned TOML tree.
//!
//! serde's derive stops at the first error; users deserve all of them at
//! once. So validation walks `toml`'s spanned document by hand: every getter
//! type-checks its value, records a located [`Diagnostic`] on a mismatch and
//! returns `None`, and the walk goes on.

use std::collections::BTreeMap;
use std::ops::Range;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use crate::diag::Diagnostic;
use crate::model::{ByteSize, Duration};
use crate::units;

pub(crate) type Value<'i> = Spanned<DeValue<'i>>;

/// Collects diagnostics during one validation.
#[derive(Debug, Default)]
pub(crate) struct Ctx {
    pub diags: Vec<Diagnostic>,
}

impl Ctx {
    pub fn push(&mut self, d: Diagnostic) {
        self.diags.push(d);
    }

    pub fn expected(&mut self, v: &Value<'_>, what: &str, path: &str) {
        let found = v.get_ref().type_str();
        let d = Diagnostic::new(v.span(), format!("`{path}` must be {what}, found {found}"))
            .label(format!("expected {what}"));
        self.push(match example_for(what) {
            Some(example) => d.hint(format!("write it like {example}")),
            None => d.hint(format!("docs/spec.md shows the forms `{path}` takes")),
        });
    }
}

fn example_for(what: &str) -> Option<&'static str> {
    Some(match what {
        "a string" => "`key = \"text\"`",
        "a boolean" => "`key = true`",
        "an integer" => "`key = 3`",
        "a table" => "`key = { name = \"value\" }`",
        "an array of strings" => "`key = [\"a\", \"b\"]`",
        "a duration" => "`key = \"500ms\"` (units: h, m, s, ms)",
        "a size" => "`key = \"256MiB\"` (units: B, KiB, MiB, GiB, KB, MB, GB)",
        _ => return None,
    })
}

/// The closest known key to `key`, when one is close enough to be a typo.
pub(crate) fn suggest<'k>(key: &str, known: impl IntoIterator<Item = &'k str>) -> Option<&'k str> {
    known
        .into_iter()
        .map(|k| (strsim::jaro_winkler(key, k), k))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, k)| k)
}

/// A table being read, with the dotted path users see in messages.
#[derive(Debug, Clone)]
pub(crate) struct Table<'a, 'i> {
    pub entries: &'a DeTable<'i>,
    /// Where the table is named (its header key), for "missing key" errors.
    pub span: Range<usize>,
    pub path: String,
}

impl<'a, 'i> Table<'a, 'i> {
    pub fn new(entries: &'a DeTable<'i>, span: Range<usize>, path: impl Into<String>) -> Self {
        Table {
            entries,
            span,
            path: path.into(),
        }
    }

    /// Reads `v` as a table, or records an error.
    pub fn of(ctx: &mut Ctx, v: &'a Value<'i>, path: String) -> Option<Self> {
        match v.get_ref() {
            DeValue::Table(t) => Some(Table::new(t, v.span(), path)),
            _ => {
                ctx.expected(v, "a table", &path);
                None
            }
        }
    }

    pub fn child_path(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{}", self.path, key)
        }
    }

    /// Records an error for every key not in `known`.
    pub fn deny_unknown(&self, ctx: &mut Ctx, known: &[&str]) {
        for (key, _) in self.entries.iter() {
            let name: &str = key.get_ref();
            if known.contains(&name) {
                continue;
            }
            let where_ = if self.path.is_empty() {
                "at the top level".to_owned()
            } else {
                format!("in `{}`", self.path)
            };
            let mut d = Diagnostic::new(key.span(), format!("unknown key `{name}` {where_}"))
                .label("unknown key");
            d = match suggest(name, known.iter().copied()) {
                Some(k) => d.hint(format!("did you mean `{k}`?")),
                None => d.hint(format!("known keys here: {}", known.join(", "))),
            };
            ctx.push(d);
        }
    }

    pub fn get(&self, key: &str) -> Option<&'a Value<'i>> {
        self.entries.get(key)
    }

    pub fn key_span(&self, key: &str) -> Option<Range<usize>> {
        self.entries.get_key_value(key).map(|(k, _)| k.span())
    }

    /// Every entry, as (name, name span, value).
    pub fn iter(
        &self,
    ) -> impl Iterator<Item = (&'a str, Range<usize>, &'a Value<'i>)> + use<'a, 'i> {
        self.entries
            .iter()
            .map(|(k, v)| (k.get_ref().as_ref(), k.span(), v))
    }

    pub fn missing(&self, ctx: &mut Ctx, key: &str, hint: &str) {
        ctx.push(
            Diagnostic::new(
                self.span.clone(),
                format!("`{}` is missing the required key `{key}`", self.path),
            )
            .label(format!("`{key}` is required here"))
            .hint(hint.to_owned()),
        );
    }

    pub fn str(&self, ctx: &mut Ctx, key: &str) -> Option<(String, Range<usize>)> {
        let v = self.get(key)?;
        match v.get_ref() {
            DeValue::String(s) => Some((s.to_string(), v.span())),
            _ => {
                ctx.expected(v, "a string", &self.child_path(key));
                None
            }
        }
    }

    pub fn bool(&self, ctx: &mut Ctx, key: &str) -> Option<bool> {
        let v = self.get(key)?;
        match v.get_ref() {
            DeValue::Boolean(b) => Some(*b),
            _ => {
                ctx.expected(v, "a boolean", &self.child_path(key));
                None
            }
        }
    }

    /// An integer in `min..=max`.
    pub fn int(&self, ctx: &mut Ctx, key: &str, min: i64, max: i64) -> Option<i64> {
        let v = self.get(key)?;
        int_value(ctx, v, &self.child_path(key), min, max)
    }

    pub fn strings(&self, ctx: &mut Ctx, key: &str) -> Option<Vec<(String, Range<usize>)>> {
        let v = self.get(key)?;
        strings_value(ctx, v, &self.child_path(key))
    }

    /// A table of strings (`env`, `labels`, …), by key, with value spans.
    pub fn string_map(
        &self,
        ctx: &mut Ctx,
        key: &str,
    ) -> BTreeMap<String, (String, Range<usize>, Range<usize>)> {
        let mut out = BTreeMap::new();
        let Some(v) = self.get(key) else { return out };
        let Some(t) = Table::of(ctx, v, self.child_path(key)) else {
            return out;
        };
        for (name, name_span, value) in t.iter() {
            match value.get_ref() {
                DeValue::String(s) => {
                    out.insert(name.to_owned(), (s.to_string(), name_span, value.span()));
                }
                _ => ctx.expected(value, "a string", &t.child_path(name)),
            }
        }
        out
    }

    pub fn duration(&self, ctx: &mut Ctx, key: &str) -> Option<Duration> {
        let v = self.get(key)?;
        let path = self.child_path(key);
        let DeValue::String(s) = v.get_ref() else {
            ctx.expected(v, "a duration", &path);
            return None;
        };
        match units::parse_duration(s) {
            Ok(d) => Some(d),
            Err(why) => {
                ctx.push(
                    Diagnostic::new(v.span(), format!("`{path}` is not a valid duration: {why}"))
                        .label("invalid duration")
                        .hint("write a duration like \"500ms\", \"10s\" or \"1m30s\""),
                );
                None
            }
        }
    }

    pub fn size(&self, ctx: &mut Ctx, key: &str) -> Option<ByteSize> {
        let v = self.get(key)?;
        let path = self.child_path(key);
        let DeValue::String(s) = v.get_ref() else {
            ctx.expected(v, "a size", &path);
            return None;
        };
        match units::parse_size(s) {
            Ok(d) => Some(d),
            Err(why) => {
                ctx.push(
                    Diagnostic::new(v.span(), format!("`{path}` is not a valid size: {why}"))
                        .label("invalid size")
                        .hint("write a size like \"256MiB\" or \"1GiB\""),
                );
                None
            }
        }
    }
}

pub(crate) fn int_value(
    ctx: &mut Ctx,
    v: &Value<'_>,
    path: &str,
    min: i64,
    max: i64,
) -> Option<i64> {
    let DeValue::Integer(i) = v.get_ref() else {
        ctx.expected(v, "an integer", path);
        return None;
    };
    let parsed = i64::from_str_radix(i.as_str(), i.radix()).ok();
    match parsed {
        Some(n) if (min..=max).contains(&n) => Some(n),
        _ => {
            ctx.push(
                Diagnostic::new(
                    v.span(),
                    format!("`{path}` must be between {min} and {max}"),
                )
                .label("out of range")
                .hint(format!("use a whole number from {min} to {max}")),
            );
            None
        }
    }
}

pub(crate) fn strings_value(
    ctx: &mut Ctx,
    v: &Value<'_>,
    path: &str,
) -> Option<Vec<(String, Range<usize>)>> {
    let DeValue::Array(items) = v.get_ref() else {
        ctx.expected(v, "an array of strings", path);
        return None;
    };
    let mut out = Vec::with_capacity(items.len());
    let mut ok = true;
    for (i, item) in items.iter().enumerate() {
        match item.get_ref() {
            DeValue::String(s) => out.push((s.to_string(), item.span())),
            _ => {
                ctx.expected(item, "a string", &format!("{path}[{i}]"));
                ok = false;
            }
        }
    }
    ok.then_some(out)
}
