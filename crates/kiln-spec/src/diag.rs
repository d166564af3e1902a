//! Located diagnostics: every problem in a spec names its file, line and
//! column, shows the offending snippet with a caret, and says how to fix it.

use std::fmt;
use std::ops::Range;

use codespan_reporting::diagnostic::{Diagnostic as Report, Label};
use codespan_reporting::files::SimpleFile;
use codespan_reporting::term::{self, termcolor};

/// One problem found in a spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    /// Byte range in the source that the problem is about.
    pub span: Range<usize>,
    /// What is wrong, as a sentence without a trailing period.
    pub message: String,
    /// A short label printed under the caret.
    pub label: String,
    /// Another place that explains this one ("first declared here").
    pub related: Option<(Range<usize>, String)>,
    /// How to fix it.
    pub hint: Option<String>,
}

impl Diagnostic {
    pub fn new(span: Range<usize>, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            span,
            message: message.into(),
            label: String::new(),
            related: None,
            hint: None,
        }
    }

    pub fn label(mut self, label: impl Into<String>) -> Diagnostic {
        self.label = label.into();
        self
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Diagnostic {
        self.hint = Some(hint.into());
        self
    }

    pub fn related(mut self, span: Range<usize>, label: impl Into<String>) -> Diagnostic {
        self.related = Some((span, label.into()));
        self
    }
}

/// Every problem found in one file, with the source needed to show them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostics {
    pub file: String,
    pub source: String,
    pub items: Vec<Diagnostic>,
}

impl Diagnostics {
    /// 1-based line and column of a byte offset.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let mut offset = offset.min(self.source.len());
        while !self.source.is_char_boundary(offset) {
            offset -= 1;
        }
        let before = &self.source[..offset];
        let line = before.matches('\n').count() + 1;
        let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        (line, col)
    }

    /// Renders every diagnostic like a compiler does, with ANSI colour when
    /// `color` is set.
    pub fn render(&self, color: bool) -> String {
        // Control characters from an untrusted spec must not reach the
        // terminal as escape sequences: each becomes `?` (one byte for one
        // byte, so every span still points at the same place).
        let source = sanitize(&self.source);
        let file = SimpleFile::new(self.file.as_str(), source.as_str());
        let config = term::Config::default();
        let mut out = if color {
            termcolor::Buffer::ansi()
        } else {
            termcolor::Buffer::no_color()
        };
        for d in &self.items {
            let report = to_report(d, &source);
            // Rendering into memory cannot fail for a span inside the file;
            // `to_report` clamps every span to the source.
            let _ = term::emit_to_write_style(&mut out, &config, &file, &report);
        }
        let n = self.items.len();
        let summary = format!(
            "error: {} has {n} problem{}\n",
            self.file,
            if n == 1 { "" } else { "s" }
        );
        let mut text = String::from_utf8_lossy(out.as_slice()).into_owned();
        text.push_str(&summary);
        text
    }
}

fn clamp(span: &Range<usize>, len: usize) -> Range<usize> {
    let start = span.start.min(len);
    start..span.end.clamp(start, len)
}

/// Replaces control characters (but newlines and tabs) with `?`.
fn sanitize(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() && c != '\n' && c != '\t' && c != '\r' {
                '?'
            } else {
                c
            }
        })
        .collect()
}

fn clamp_to(span: &Range<usize>, source: &str) -> Range<usize> {
    let mut r = clamp(span, source.len());
    while !source.is_char_boundary(r.start) {
        r.start -= 1;
    }
    while !source.is_char_boundary(r.end) {
        r.end += 1;
    }
    r
}

fn to_report(d: &Diagnostic, source: &str) -> Report<()> {
    let mut labels =
        vec![Label::primary((), clamp_to(&d.span, source)).with_message(sanitize(&d.label))];
    if let Some((span, label)) = &d.related {
        labels.push(Label::secondary((), clamp_to(span, source)).with_message(sanitize(label)));
    }
    let mut report = Report::error()
        .with_message(sanitize(&d.message))
        .with_labels(labels);
    if let Some(hint) = &d.hint {
        report = report.with_notes(vec![format!("hint: {}", sanitize(hint))]);
    }
    report
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render(false))
    }
}

impl std::error::Error for Diagnostics {}
