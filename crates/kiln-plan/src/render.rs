//! Terraform-style text of a plan: `+` create, `-/+` replace (with the
//! fields that forced it), `-` destroy, `~` change in place of routes and
//! traffic (never of an instance).

use std::fmt::Write as _;

use kiln_spec::model::{ByteSize, Protocol, Route, Strategy};
use serde_json::Value;

use crate::diff::Change;
use crate::steps::{Plan, RouteAction, RoutePlan, ServiceAction, ServicePlan};

/// How many hex digits of a digest the text shows.
const SHORT: usize = 12;

#[derive(Clone, Copy)]
enum Sigil {
    Create,
    Replace,
    Change,
    Destroy,
}

impl Sigil {
    fn text(self) -> &'static str {
        match self {
            Sigil::Create => "+",
            Sigil::Replace => "-/+",
            Sigil::Change => "~",
            Sigil::Destroy => "-",
        }
    }

    fn ansi(self) -> &'static str {
        match self {
            Sigil::Create => "\x1b[32m",
            Sigil::Replace | Sigil::Change => "\x1b[33m",
            Sigil::Destroy => "\x1b[31m",
        }
    }
}

struct Out {
    text: String,
    color: bool,
}

impl Out {
    fn header(&mut self, header: &str) {
        if self.color {
            let _ = writeln!(self.text, "  \x1b[1m# {header}\x1b[0m");
        } else {
            let _ = writeln!(self.text, "  # {header}");
        }
    }

    fn comment(&mut self, comment: &str) {
        let _ = writeln!(self.text, "      # {comment}");
    }

    /// A line with its sigil right-aligned in a three-column gutter.
    fn line(&mut self, sigil: Sigil, rest: &str) {
        let sign = sigil.text();
        let pad = " ".repeat(3 - sign.len());
        if self.color {
            let _ = writeln!(self.text, "{pad}{}{sign}\x1b[0m {rest}", sigil.ansi());
        } else {
            let _ = writeln!(self.text, "{pad}{sign} {rest}");
        }
    }

    /// Field changes, indented under the line before; `note` (if any) is
    /// aligned in a column after the longest one.
    fn changes(&mut self, changes: &[Change], note: Option<&str>) {
        let lines: Vec<(Sigil, String)> = changes.iter().map(change_line).collect();
        let width = lines
            .iter()
            .map(|(_, l)| l.chars().count())
            .max()
            .unwrap_or(0);
        for (sigil, line) in lines {
            let mut rest = line.clone();
            if let Some(note) = note {
                let pad = width - line.chars().count();
                let _ = write!(rest, "{}   # {note}", " ".repeat(pad));
            }
            self.text.push_str("    ");
            self.line(sigil, &rest);
        }
    }
}

/// The plan as people read it; ANSI colors when `color`.
pub fn render_plan(plan: &Plan, color: bool) -> String {
    if plan.is_empty() {
        return format!(
            "No changes. What runs matches generation {}.\n",
            plan.generation_hash.short(SHORT)
        );
    }
    let mut out = Out {
        text: "kiln will perform the following actions:\n\n".to_owned(),
        color,
    };
    for service in &plan.services {
        render_service(&mut out, service);
        out.text.push('\n');
    }
    for route in &plan.routes {
        render_route(&mut out, route);
        out.text.push('\n');
    }
    let _ = writeln!(out.text, "{}", plan.summary());
    out.text
}

fn render_service(out: &mut Out, plan: &ServicePlan) {
    let name = &plan.service;
    let (header, comments): (String, &[String]) = match &plan.action {
        ServiceAction::Create => (format!("service.{name} will be created"), &[]),
        ServiceAction::Replace { .. } => {
            let how = plan.strategy.as_ref().map(describe).unwrap_or_default();
            let rest = plan.reasons.get(1..).unwrap_or_default();
            (format!("service.{name} will be replaced ({how})"), rest)
        }
        ServiceAction::Scale { from, to } => (
            format!("service.{name} will be scaled from {from} to {to} replicas"),
            &[],
        ),
        ServiceAction::Heal { .. } => (format!("service.{name} will be healed"), &plan.reasons),
        ServiceAction::Resume { .. } => (
            format!("service.{name} will finish its rollout"),
            &plan.reasons,
        ),
        ServiceAction::Destroy => (
            format!("service.{name} will be destroyed (no longer declared)"),
            &[],
        ),
        ServiceAction::Unchanged => (format!("service.{name} is unchanged"), &[]),
    };
    out.header(&header);
    for comment in comments {
        out.comment(comment);
    }
    if let Some(command) = &plan.backup {
        out.comment(&format!(
            "backup first: `{}` in a fresh instance, output stored by digest",
            command.join(" ")
        ));
    }
    if let Some(u) = &plan.unavailable {
        let backup = u
            .backup_timeout
            .map(|t| format!(" + backup (at most {t})"))
            .unwrap_or_default();
        out.comment(&format!(
            "unavailable from stop until healthy: at most stop_grace {}{backup} + start (deadline {})",
            u.stop_grace, u.deadline
        ));
    }

    let changes = match &plan.action {
        ServiceAction::Replace { changes } => changes.as_slice(),
        _ => &[],
    };
    let paired = plan.replaced();
    for (i, (old, new)) in plan.destroys.iter().zip(&plan.creates).enumerate() {
        out.line(Sigil::Replace, &format!("instance {old} → {new}"));
        if i == 0 {
            out.changes(changes, Some("forces replacement"));
        }
    }
    if paired == 0 {
        out.changes(changes, Some("forces replacement"));
    }
    for id in &plan.creates[paired..] {
        out.line(Sigil::Create, &format!("instance {id}"));
    }
    for id in &plan.destroys[paired..] {
        out.line(Sigil::Destroy, &format!("instance {id}"));
    }
    if let ServiceAction::Resume { ids } = &plan.action {
        for id in ids {
            out.line(Sigil::Change, &format!("instance {id} (into rotation)"));
        }
    }
}

fn render_route(out: &mut Out, plan: &RoutePlan) {
    let name = &plan.name;
    match &plan.action {
        RouteAction::Create { route } => {
            out.header(&format!("route.{name} will be configured"));
            out.line(Sigil::Create, &describe_route(name, route));
        }
        RouteAction::Change { new, changes, .. } => {
            out.header(&format!("route.{name} will be reconfigured"));
            out.line(Sigil::Change, &describe_route(name, new));
            out.changes(changes, None);
        }
        RouteAction::Remove { old } => {
            out.header(&format!("route.{name} will be removed"));
            out.line(Sigil::Destroy, &describe_route(name, old));
        }
    }
}

fn describe_route(name: &str, route: &Route) -> String {
    let tcp = if route.protocol == Protocol::Tcp {
        " (tcp)"
    } else {
        ""
    };
    format!(
        "route {name}: {} → {}:{}{tcp}",
        route.listen, route.service, route.port
    )
}

fn describe(strategy: &Strategy) -> String {
    match strategy {
        Strategy::Rolling {
            max_surge,
            max_unavailable,
        } => format!("rolling: max_surge={max_surge}, max_unavailable={max_unavailable}"),
        Strategy::BlueGreen => "blue-green".to_owned(),
        Strategy::Canary { steps, hold } => {
            let mut weights: Vec<String> = steps.iter().map(|w| format!("{w}%")).collect();
            weights.push("100%".to_owned());
            format!("canary: {}, hold {hold} each", weights.join(" → "))
        }
        Strategy::Recreate => "recreate".to_owned(),
    }
}

fn change_line(change: &Change) -> (Sigil, String) {
    let path = &change.path;
    match (&change.old, &change.new) {
        (Some(old), Some(new)) => (
            Sigil::Change,
            format!("{path}: {} → {}", value(path, old), value(path, new)),
        ),
        (None, Some(new)) => (Sigil::Create, format!("{path}: {}", value(path, new))),
        (Some(old), None) => (Sigil::Destroy, format!("{path}: {}", value(path, old))),
        (None, None) => (Sigil::Change, path.clone()),
    }
}

/// A JSON value as one short line; digests are shortened, sizes in units.
fn value(path: &str, value: &Value) -> String {
    match value {
        Value::Number(n) if path == "resources.memory" => match n.as_u64() {
            Some(bytes) => ByteSize { bytes }.to_string(),
            None => n.to_string(),
        },
        Value::String(s) => match s.strip_prefix("sha256:") {
            Some(hex) if hex.len() > SHORT && hex.is_ascii() => {
                format!("\"sha256:{}…\"", &hex[..SHORT])
            }
            _ => Value::String(s.clone()).to_string(),
        },
        other => other.to_string(),
    }
}
