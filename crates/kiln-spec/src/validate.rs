//! From the spanned TOML document to the validated [`Spec`], collecting every
//! problem on the way.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::ops::Range;

use toml::de::DeTable;

use crate::check;
use crate::diag::{Diagnostic, Diagnostics};
use crate::model::{
    Balance, Copy, Driver, Image, ImageDir, ImageSource, Policy, Project, Protocol, Route, Runtime,
    Spec, Strategy, User, Volume,
};
use crate::read::{Ctx, Table, Value};
use crate::service::{self, Claims};

pub(crate) const TOP_KEYS: &[&str] = &[
    "project", "image", "service", "volume", "route", "runtime", "policy",
];
pub(crate) const PROJECT_KEYS: &[&str] = &["name"];
pub(crate) const IMAGE_KEYS: &[&str] = &[
    "from",
    "copy",
    "closure",
    "debian",
    "entrypoint",
    "cmd",
    "env",
    "workdir",
    "user",
    "labels",
    "expose",
    "users",
    "dirs",
];
pub(crate) const USER_KEYS: &[&str] = &["name", "uid", "gid", "home", "shell"];
pub(crate) const DIR_KEYS: &[&str] = &["path", "mode", "owner"];
pub(crate) const COPY_KEYS: &[&str] = &["src", "dst", "mode"];
pub(crate) const VOLUME_KEYS: &[&str] = &["shared", "exclusive"];
pub(crate) const ROUTE_KEYS: &[&str] = &[
    "listen",
    "service",
    "port",
    "protocol",
    "maintenance",
    "timeout",
    "max_connections",
    "balance",
    "error_pages",
    "hosts",
];
pub(crate) const RUNTIME_KEYS: &[&str] = &["driver"];
pub(crate) const POLICY_KEYS: &[&str] = &["require_signed", "trusted_keys", "keep_generations"];

/// Parses and validates the text of a `kiln.toml`. `file` is the name used
/// in messages.
pub fn parse(source: &str, file: &str) -> Result<Spec, Diagnostics> {
    let fail = |items| Diagnostics {
        file: file.to_owned(),
        source: source.to_owned(),
        items,
    };
    let (doc, errors) = DeTable::parse_recoverable(source);
    if !errors.is_empty() {
        let items = errors
            .iter()
            .map(|e| {
                let span = e.span().unwrap_or(0..0);
                Diagnostic::new(span, format!("invalid TOML: {}", e.message().trim_end()))
                    .label("here")
                    .hint("see https://toml.io for the syntax")
            })
            .collect();
        return Err(fail(items));
    }
    let mut ctx = Ctx::default();
    let root = Table::new(doc.get_ref(), 0..0, "");
    let spec = read_spec(&mut ctx, &root);
    match spec {
        Some(spec) if ctx.diags.is_empty() => Ok(spec),
        _ => {
            let mut items = ctx.diags;
            items.sort_by_key(|d| (d.span.start, d.span.end));
            items.dedup();
            if items.is_empty() {
                items.push(
                    Diagnostic::new(0..0, "the spec is incomplete")
                        .hint("add a [project] table with a name"),
                );
            }
            Err(fail(items))
        }
    }
}

/// The names declared under a top-level table like `[service.*]`.
fn declared(root: &Table<'_, '_>, key: &str) -> BTreeSet<String> {
    match root.get(key).map(|v| v.get_ref()) {
        Some(toml::de::DeValue::Table(t)) => t.keys().map(|k| k.get_ref().to_string()).collect(),
        _ => BTreeSet::new(),
    }
}

/// Each entry of a top-level table of named tables, name-checked.
fn named<'a, 'i>(
    ctx: &mut Ctx,
    root: &Table<'a, 'i>,
    key: &str,
    kind: &str,
) -> Vec<(String, Table<'a, 'i>)> {
    let Some(v) = root.get(key) else {
        return Vec::new();
    };
    let Some(outer) = Table::of(ctx, v, key.to_owned()) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (name, name_span, value) in outer.iter() {
        check::name(ctx, kind, name, name_span.clone());
        let path = format!("{key}.{name}");
        let table = match value.get_ref() {
            toml::de::DeValue::Table(t) => Table::new(t, name_span, path),
            _ => {
                ctx.push(
                    Diagnostic::new(value.span(), format!("`{path}` must be a table"))
                        .label("expected a table")
                        .hint(format!("write it as a [{key}.{name}] section")),
                );
                continue;
            }
        };
        // A badly named table is still read, so the problems inside it are
        // reported now rather than after the rename; the name error alone
        // keeps the spec from validating.
        out.push((name.to_owned(), table));
    }
    out
}

fn read_spec(ctx: &mut Ctx, root: &Table<'_, '_>) -> Option<Spec> {
    root.deny_unknown(ctx, TOP_KEYS);
    let project = read_project(ctx, root);

    let image_names = declared(root, "image");
    let mut images = BTreeMap::new();
    let mut from_spans = BTreeMap::new();
    for (name, t) in named(ctx, root, "image", "image") {
        if let Some((image, from_span)) = read_image(ctx, &t, &image_names) {
            from_spans.insert(name.clone(), from_span);
            images.insert(name, image);
        }
    }
    check_image_cycles(ctx, &images, &from_spans);

    let mut volumes = BTreeMap::new();
    let mut volume_spans = BTreeMap::new();
    let mut exclusive_set = BTreeSet::new();
    for (name, t) in named(ctx, root, "volume", "volume") {
        t.deny_unknown(ctx, VOLUME_KEYS);
        let shared = t.bool(ctx, "shared").unwrap_or(false);
        let exclusive = t.bool(ctx, "exclusive");
        if shared && exclusive == Some(true) {
            ctx.push(
                Diagnostic::new(t.key_span("exclusive").unwrap_or(t.span.clone()), format!("volume `{name}` cannot be both shared and exclusive"))
                    .label("conflicts with `shared = true`")
                    .hint("a shared volume is mounted by several services at once; remove one of the two keys"),
            );
        }
        if exclusive.is_some() {
            exclusive_set.insert(name.clone());
        }
        volume_spans.insert(name.clone(), t.span.clone());
        volumes.insert(
            name,
            Volume {
                shared,
                exclusive: exclusive.unwrap_or(false),
            },
        );
    }

    let mut services = BTreeMap::new();
    let mut claims = Claims::default();
    let volume_names: BTreeSet<String> = volumes.keys().cloned().collect();
    for (name, t) in named(ctx, root, "service", "service") {
        if let Some(s) =
            service::read_service(ctx, &name, &t, &image_names, &volume_names, &mut claims)
        {
            services.insert(name, s);
        }
    }
    service::check_volume_claims(ctx, &claims, &mut volumes, &exclusive_set, &mut services);

    let routes = read_routes(ctx, root, &services);
    let runtime = read_runtime(ctx, root);
    let policy = read_policy(ctx, root);
    Some(Spec {
        project: project?,
        images,
        services,
        volumes,
        routes,
        runtime: runtime?,
        policy: policy?,
    })
}

fn read_project(ctx: &mut Ctx, root: &Table<'_, '_>) -> Option<Project> {
    let Some(v) = root.get("project") else {
        ctx.push(
            Diagnostic::new(0..0, "the spec has no [project] table")
                .label("expected [project] with a name")
                .hint("start the file with:\n[project]\nname = \"my-app\""),
        );
        return None;
    };
    let span = root.key_span("project").unwrap_or(0..0);
    let t = Table::of(ctx, v, "project".into())?;
    let t = Table { span, ..t };
    t.deny_unknown(ctx, PROJECT_KEYS);
    let Some((name, name_span)) = t.str(ctx, "name") else {
        if t.get("name").is_none() {
            t.missing(ctx, "name", "add `name = \"my-app\"` under [project]");
        }
        return None;
    };
    check::name(ctx, "project", &name, name_span).then_some(Project { name })
}

fn read_image(
    ctx: &mut Ctx,
    t: &Table<'_, '_>,
    local: &BTreeSet<String>,
) -> Option<(Image, Range<usize>)> {
    t.deny_unknown(ctx, IMAGE_KEYS);
    let (from, from_span) = match t.str(ctx, "from") {
        Some((text, span)) => (
            check::image_source(ctx, &text, span.clone(), local, true),
            span,
        ),
        None => (Some(ImageSource::Scratch), t.span.clone()),
    };
    let mut copy = Vec::new();
    if let Some(v) = t.get("copy") {
        copy = read_copy(ctx, v, &t.child_path("copy"));
    }
    let debian = t.strings(ctx, "debian").unwrap_or_default();
    for (pkg, span) in &debian {
        let ok = pkg.len() >= 2
            && pkg.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
            && pkg
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c));
        if !ok {
            ctx.push(
                Diagnostic::new(
                    span.clone(),
                    format!("`{pkg}` is not a Debian package name"),
                )
                .label("invalid package name")
                .hint(
                    "use the package's name as `apt-cache show` knows it, like \"ca-certificates\"",
                ),
            );
        }
    }
    let argv = |ctx: &mut Ctx, key: &str| -> Option<Vec<String>> {
        let items = t.strings(ctx, key)?;
        if items.is_empty() {
            ctx.push(
                Diagnostic::new(
                    t.get(key).map_or(t.span.clone(), |v| v.span()),
                    format!("`{}` cannot be empty", t.child_path(key)),
                )
                .label("empty")
                .hint("name the program to run, like [\"/app/web\"], or leave the key out"),
            );
            return None;
        }
        Some(items.into_iter().map(|(s, _)| s).collect())
    };
    let entrypoint = argv(ctx, "entrypoint");
    let cmd = argv(ctx, "cmd");
    let mut env = BTreeMap::new();
    for (k, (v, kspan, _)) in t.string_map(ctx, "env") {
        if crate::service::is_reserved(&k) {
            ctx.push(crate::service::reserved(&k, kspan));
        } else if check::env_name(ctx, "environment variable", &k, kspan) {
            env.insert(k, v);
        }
    }
    let labels = t
        .string_map(ctx, "labels")
        .into_iter()
        .map(|(k, (v, _, _))| (k, v))
        .collect();
    let workdir = t
        .str(ctx, "workdir")
        .and_then(|(w, span)| check::container_path(ctx, "workdir", &w, span).then_some(w));
    let user = t.str(ctx, "user").map(|(u, _)| u);
    let mut expose = Vec::new();
    if let Some(v) = t.get("expose") {
        if let toml::de::DeValue::Array(items) = v.get_ref() {
            for (i, item) in items.iter().enumerate() {
                if let Some(p) =
                    crate::read::int_value(ctx, item, &format!("{}.expose[{i}]", t.path), 1, 65535)
                {
                    expose.push(p as u16);
                }
            }
            expose.sort_unstable();
            expose.dedup();
        } else {
            ctx.expected(v, "an array of port numbers", &t.child_path("expose"));
        }
    }
    let image = Image {
        from: from?,
        copy,
        closure: t.bool(ctx, "closure").unwrap_or(false),
        debian: debian.into_iter().map(|(p, _)| p).collect(),
        entrypoint,
        cmd,
        env,
        workdir,
        user,
        labels,
        expose,
        users: Vec::new(),
        dirs: Vec::new(),
    };
    let users = t
        .get("users")
        .map(|v| read_users(ctx, v, &t.child_path("users")))
        .unwrap_or_default();
    let dirs = t
        .get("dirs")
        .map(|v| read_dirs(ctx, v, &t.child_path("dirs"), &users))
        .unwrap_or_default();
    Some((
        Image {
            users,
            dirs,
            ..image
        },
        from_span,
    ))
}

/// `users = [{ name, uid, gid, home, shell }]`: unique names and uids, not
/// root (the image always has root).
fn read_users(ctx: &mut Ctx, v: &Value<'_>, path: &str) -> Vec<User> {
    let toml::de::DeValue::Array(items) = v.get_ref() else {
        ctx.expected(v, "an array of { name, uid } tables", path);
        return Vec::new();
    };
    let mut out: Vec<User> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let Some(t) = Table::of(ctx, item, format!("{path}[{i}]")) else {
            continue;
        };
        t.deny_unknown(ctx, USER_KEYS);
        if t.get("name").is_none() {
            t.missing(ctx, "name", "name the user, like `name = \"postgres\"`");
        }
        if t.get("uid").is_none() {
            t.missing(ctx, "uid", "give the user a number, like `uid = 999`");
        }
        let name = t.str(ctx, "name");
        let uid = t.int(ctx, "uid", 1, 65534).map(|n| n as u32);
        let gid = t.int(ctx, "gid", 1, 65534).map(|n| n as u32);
        let home = t.str(ctx, "home");
        let shell = t.str(ctx, "shell");
        let (Some((name, nspan)), Some(uid)) = (name, uid) else {
            continue;
        };
        let valid = !name.is_empty()
            && name.len() <= 32
            && name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_-".contains(c));
        if !valid || name == "root" {
            ctx.push(
                Diagnostic::new(nspan, format!("`{name}` cannot be declared as a user"))
                    .label(if name == "root" { "root is always there" } else { "invalid user name" })
                    .hint("use up to 32 lowercase letters, digits, `_` or `-`, starting with a letter or `_`, like \"postgres\""),
            );
            continue;
        }
        if out.iter().any(|u| u.name == name || u.uid == uid) {
            ctx.push(
                Diagnostic::new(
                    nspan,
                    format!("user `{name}` (uid {uid}) is declared twice"),
                )
                .label("duplicate name or uid")
                .hint("give each user its own name and uid"),
            );
            continue;
        }
        let mut ok = true;
        for (key, value) in [("home", &home), ("shell", &shell)] {
            if let Some((p, span)) = value {
                ok &= check::container_path(ctx, key, p, span.clone());
            }
        }
        if ok {
            out.push(User {
                name,
                uid,
                gid: gid.unwrap_or(uid),
                home: home.map_or_else(|| "/nonexistent".to_owned(), |(h, _)| h),
                shell: shell.map_or_else(|| "/usr/sbin/nologin".to_owned(), |(s, _)| s),
            });
        }
    }
    out
}

/// `dirs = [{ path, mode, owner }]`: `owner` is `"uid[:gid]"` or a user of
/// `users`.
fn read_dirs(ctx: &mut Ctx, v: &Value<'_>, path: &str, users: &[User]) -> Vec<ImageDir> {
    let toml::de::DeValue::Array(items) = v.get_ref() else {
        ctx.expected(v, "an array of { path, mode, owner } tables", path);
        return Vec::new();
    };
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let Some(t) = Table::of(ctx, item, format!("{path}[{i}]")) else {
            continue;
        };
        t.deny_unknown(ctx, DIR_KEYS);
        if t.get("path").is_none() {
            t.missing(
                ctx,
                "path",
                "name the directory, like `path = \"/run/postgresql\"`",
            );
        }
        let dir = t.str(ctx, "path");
        let mode = t.int(ctx, "mode", 0, 0o7777).map_or(0o755, |m| m as u32);
        let owner = match t.str(ctx, "owner") {
            None => Some((0, 0)),
            Some((o, span)) => {
                let found = users.iter().find(|u| u.name == o).map(|u| (u.uid, u.gid));
                let numeric = || -> Option<(u32, u32)> {
                    match o.split_once(':') {
                        Some((u, g)) => Some((u.parse().ok()?, g.parse().ok()?)),
                        None => {
                            let u = o.parse().ok()?;
                            Some((u, u))
                        }
                    }
                };
                let owner = found.or_else(numeric);
                if owner.is_none() {
                    ctx.push(
                        Diagnostic::new(
                            span,
                            format!("owner `{o}` is neither `uid[:gid]` nor a user of `users`"),
                        )
                        .label("unknown owner")
                        .hint("write numbers, like \"999:999\", or declare the user in `users`"),
                    );
                }
                owner
            }
        };
        let (Some((dir, dspan)), Some((uid, gid))) = (dir, owner) else {
            continue;
        };
        if check::container_path(ctx, "directory", &dir, dspan) {
            out.push(ImageDir {
                path: dir,
                mode,
                uid,
                gid,
            });
        }
    }
    out
}

fn read_copy(ctx: &mut Ctx, v: &Value<'_>, path: &str) -> Vec<Copy> {
    let toml::de::DeValue::Array(items) = v.get_ref() else {
        ctx.expected(v, "an array of { src, dst } tables", path);
        return Vec::new();
    };
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let Some(t) = Table::of(ctx, item, format!("{path}[{i}]")) else {
            continue;
        };
        t.deny_unknown(ctx, COPY_KEYS);
        let src = t.str(ctx, "src");
        let dst = t.str(ctx, "dst");
        if t.get("src").is_none() {
            t.missing(
                ctx,
                "src",
                "name the file or directory to copy, relative to kiln.toml",
            );
        }
        if t.get("dst").is_none() {
            t.missing(
                ctx,
                "dst",
                "name where it goes in the image, like \"/app/web\"",
            );
        }
        let mode = t.int(ctx, "mode", 0, 0o7777).map(|m| m as u32);
        let (Some((src, sspan)), Some((dst, dspan))) = (src, dst) else {
            continue;
        };
        let ok = check::host_path(ctx, "copy source", &src, sspan)
            & check::container_path(ctx, "copy destination", &dst, dspan);
        if ok {
            out.push(Copy { src, dst, mode });
        }
    }
    out
}

fn check_image_cycles(
    ctx: &mut Ctx,
    images: &BTreeMap<String, Image>,
    spans: &BTreeMap<String, Range<usize>>,
) {
    for start in images.keys() {
        let mut seen = vec![start.as_str()];
        let mut current = start.as_str();
        while let Some(Image {
            from: ImageSource::Local(next),
            ..
        }) = images.get(current)
        {
            if next == start {
                ctx.push(
                    Diagnostic::new(
                        spans[start].clone(),
                        format!(
                            "image `{start}` is built from itself: {} → {start}",
                            seen.join(" → ")
                        ),
                    )
                    .label("cycle")
                    .hint(
                        "one image of the chain must start `from = \"scratch\"` or from a digest",
                    ),
                );
                break;
            }
            if seen.contains(&next.as_str()) {
                break; // a cycle not through `start`; reported from its own members
            }
            seen.push(next);
            current = next;
        }
    }
}

fn read_routes(
    ctx: &mut Ctx,
    root: &Table<'_, '_>,
    services: &BTreeMap<String, crate::model::Service>,
) -> BTreeMap<String, Route> {
    let mut routes = BTreeMap::new();
    let mut listens: Vec<(SocketAddr, Range<usize>, String)> = Vec::new();
    let mut shared: Vec<SharedListen> = Vec::new();
    let service_names = declared(root, "service");
    for (name, t) in named(ctx, root, "route", "route") {
        t.deny_unknown(ctx, ROUTE_KEYS);
        let listen = t.str(ctx, "listen");
        let service = t.str(ctx, "service");
        if t.get("listen").is_none() {
            t.missing(
                ctx,
                "listen",
                "add the address the proxy listens on, like `listen = \"127.0.0.1:8080\"`",
            );
        }
        if t.get("service").is_none() {
            t.missing(
                ctx,
                "service",
                "name the [service.NAME] this route sends traffic to",
            );
        }
        let addr = listen.as_ref().and_then(|(text, span)| match text.parse::<SocketAddr>() {
            Ok(a) => Some((a, span.clone())),
            _ => {
                ctx.push(
                    Diagnostic::new(span.clone(), format!("`route.{name}.listen` is not an address with a port: `{text}`"))
                        .label("invalid listen address")
                        .hint("write IP:PORT, like \"127.0.0.1:8080\" or \"[::1]:8443\" (port 0 lets the system pick a free one)"),
                );
                None
            }
        });
        if let Some((a, span)) = &addr {
            // The same address may be shared by http routes told apart by
            // `hosts` (checked once every route is read).
            let clash = listens.iter().find(|(b, _, _)| {
                a.port() != 0
                    && a.port() == b.port()
                    && a != b
                    && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
            });
            if let Some((b, bspan, other)) = clash {
                ctx.push(
                    Diagnostic::new(
                        span.clone(),
                        format!(
                            "routes `{other}` and `{name}` both listen on port {}",
                            a.port()
                        ),
                    )
                    .label(format!("{a} overlaps {b}"))
                    .related(bspan.clone(), format!("`{other}` listens here"))
                    .hint("give each route its own listen address"),
                );
            } else {
                listens.push((*a, span.clone(), name.clone()));
            }
        }
        let svc = service.as_ref().and_then(|(s, span)| {
            let found = services.get(s);
            if found.is_none() && !service_names.contains(s) {
                let mut d = Diagnostic::new(
                    span.clone(),
                    format!(
                        "route `{name}` sends traffic to `{s}`, which is not a declared service"
                    ),
                )
                .label("unknown service");
                d = match crate::read::suggest(s, service_names.iter().map(String::as_str)) {
                    Some(k) => d.hint(format!("did you mean `{k}`?")),
                    None => d.hint(format!("declare [service.{s}] or name an existing service")),
                };
                ctx.push(d);
            }
            found.map(|f| (s.clone(), f, span.clone()))
        });
        let port = t.str(ctx, "port");
        let hosts = read_hosts(ctx, &t, &name);
        let maintenance = t.bool(ctx, "maintenance").unwrap_or(false);
        let timeout = t.duration(ctx, "timeout");
        if let Some(d) = timeout
            && d.millis == 0
        {
            ctx.push(
                Diagnostic::new(
                    t.key_span("timeout").unwrap_or(t.span.clone()),
                    format!("`route.{name}.timeout` must be longer than 0"),
                )
                .label("zero timeout")
                .hint("write how long the proxy may wait for an answer, like \"30s\""),
            );
        }
        let max_connections = t
            .int(ctx, "max_connections", 1, 1_000_000)
            .map(|n| u32::try_from(n).unwrap_or(u32::MAX));
        let balance = match t.str(ctx, "balance") {
            None => Balance::RoundRobin,
            Some((text, span)) => match text.as_str() {
                "round-robin" => Balance::RoundRobin,
                "least-requests" => Balance::LeastRequests,
                other => {
                    ctx.push(
                        Diagnostic::new(span, format!("`route.{name}.balance` is `{other}`"))
                            .label("unknown balancing")
                            .hint("write \"round-robin\" or \"least-requests\""),
                    );
                    Balance::RoundRobin
                }
            },
        };
        let protocol = t
            .str(ctx, "protocol")
            .and_then(|(p, span)| protocol(ctx, &p, span, &format!("route.{name}.protocol")));
        let mut error_pages = BTreeMap::new();
        for (status, (page, kspan, vspan)) in t.string_map(ctx, "error_pages") {
            match status.parse::<u16>() {
                Ok(code @ 502..=504) => {
                    if check::host_path(ctx, "error page", &page, vspan) {
                        error_pages.insert(code, page);
                    }
                }
                _ => ctx.push(
                    Diagnostic::new(kspan, format!("`route.{name}.error_pages` has a page for `{status}`"))
                        .label("not an answer of the proxy")
                        .hint("the proxy answers on its own with 502 (no instance could answer), 503 (none available, maintenance) and 504 (timeout): key the pages by those, like { \"503\" = \"pages/503.html\" }"),
                ),
            }
        }
        let Some((svc_name, svc, svc_span)) = svc else {
            continue;
        };
        let port_name = match &port {
            Some((p, span)) => {
                if !svc.ports.contains_key(p) {
                    let mut d = Diagnostic::new(
                        span.clone(),
                        format!("service `{svc_name}` has no port named `{p}`"),
                    )
                    .label("unknown port");
                    d = match crate::read::suggest(p, svc.ports.keys().map(String::as_str)) {
                        Some(k) => d.hint(format!("did you mean `{k}`?")),
                        None => d.hint(format!(
                            "declare it: ports = {{ {p} = {{}} }} in [service.{svc_name}]"
                        )),
                    };
                    ctx.push(d);
                    continue;
                }
                p.clone()
            }
            None if svc.ports.len() == 1 => svc.ports.keys().next().cloned().unwrap_or_default(),
            None => {
                ctx.push(
                    Diagnostic::new(
                        t.span.clone(),
                        format!("route `{name}` must say which port of `{svc_name}` to use"),
                    )
                    .label("`port` is required here")
                    .related(
                        svc_span,
                        format!("`{svc_name}` has {} ports", svc.ports.len()),
                    )
                    .hint(if svc.ports.is_empty() {
                        format!("declare a port in [service.{svc_name}]: ports = {{ http = {{}} }}")
                    } else {
                        format!(
                            "add `port = \"{}\"`",
                            svc.ports.keys().next().map_or("http", String::as_str)
                        )
                    }),
                );
                continue;
            }
        };
        let port_protocol = svc.ports[&port_name].protocol;
        let protocol = protocol.unwrap_or(port_protocol);
        if protocol == Protocol::Http && port_protocol == Protocol::Tcp {
            ctx.push(
                Diagnostic::new(t.key_span("protocol").unwrap_or(t.span.clone()), format!("route `{name}` speaks HTTP to port `{port_name}`, which is declared tcp"))
                    .label("protocol mismatch")
                    .hint("declare the port `protocol = \"http\"`, or make this route `protocol = \"tcp\"`"),
            );
            continue;
        }
        if protocol == Protocol::Tcp
            && let Some(span) = t.key_span("hosts")
        {
            ctx.push(
                Diagnostic::new(span, format!("route `{name}` is tcp and has `hosts`"))
                    .label("hosts are matched against HTTP's Host header")
                    .hint("remove `hosts`, or make the route `protocol = \"http\"`"),
            );
            continue;
        }
        if let Some((a, span)) = addr {
            shared.push(SharedListen {
                addr: a,
                span,
                route: name.clone(),
                hosts: hosts.clone(),
                http: protocol == Protocol::Http,
                max_connections,
            });
            routes.insert(
                name,
                Route {
                    listen: a.to_string(),
                    service: svc_name,
                    port: port_name,
                    protocol,
                    maintenance,
                    timeout,
                    max_connections,
                    balance,
                    error_pages,
                    hosts: hosts.into_iter().map(|(h, _)| h).collect(),
                },
            );
        }
    }
    check_shared_listens(ctx, &shared);
    routes
}

/// A route's listen address, kept to check the routes that share one.
struct SharedListen {
    addr: SocketAddr,
    span: Range<usize>,
    route: String,
    hosts: Vec<(String, Range<usize>)>,
    http: bool,
    max_connections: Option<u32>,
}

/// `hosts = ["shop.example", "*.shop.example"]`: DNS names, lowercase,
/// each optionally starting with `*.` (any subdomain), no port.
fn read_hosts(ctx: &mut Ctx, t: &Table<'_, '_>, route: &str) -> Vec<(String, Range<usize>)> {
    let mut out: Vec<(String, Range<usize>)> = Vec::new();
    for (host, span) in t.strings(ctx, "hosts").unwrap_or_default() {
        let name = host.strip_prefix("*.").unwrap_or(&host);
        let valid = !name.is_empty()
            && host.len() <= 253
            && name.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && !label.starts_with('-')
                    && !label.ends_with('-')
                    && label
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            });
        if !valid {
            ctx.push(
                Diagnostic::new(span, format!("`{host}` is not a host name route `{route}` can match"))
                    .label("invalid host")
                    .hint("write a lowercase DNS name without a port, like \"shop.example.com\", or \"*.example.com\" for every subdomain"),
            );
        } else if let Some((_, first)) = out.iter().find(|(h, _)| *h == host) {
            ctx.push(
                Diagnostic::new(span, format!("host `{host}` is listed twice"))
                    .label("duplicate")
                    .related(first.clone(), "first here")
                    .hint("list each host once"),
            );
        } else {
            out.push((host, span));
        }
    }
    out
}

/// Routes on one address (not port 0) must all be http, name different
/// hosts, have at most one default (no `hosts`), and agree on
/// `max_connections` (a limit of the shared listener).
fn check_shared_listens(ctx: &mut Ctx, listens: &[SharedListen]) {
    let mut groups: BTreeMap<SocketAddr, Vec<&SharedListen>> = BTreeMap::new();
    for l in listens.iter().filter(|l| l.addr.port() != 0) {
        groups.entry(l.addr).or_default().push(l);
    }
    for (addr, group) in groups.into_iter().filter(|(_, g)| g.len() > 1) {
        let first = group[0];
        if let Some(tcp) = group.iter().find(|l| !l.http) {
            let other = group
                .iter()
                .find(|l| l.route != tcp.route)
                .unwrap_or(&first);
            ctx.push(
                Diagnostic::new(tcp.span.clone(), format!("routes `{}` and `{}` both listen on {addr}, and `{}` is tcp", other.route, tcp.route, tcp.route))
                    .label("a tcp route needs its own address")
                    .related(other.span.clone(), format!("`{}` listens here", other.route))
                    .hint("give the tcp route its own listen address; http routes may share one with `hosts`"),
            );
            continue;
        }
        let defaults: Vec<&&SharedListen> = group.iter().filter(|l| l.hosts.is_empty()).collect();
        if defaults.len() > 1 {
            ctx.push(
                Diagnostic::new(defaults[1].span.clone(), format!("routes `{}` and `{}` both listen on {addr} for every host", defaults[0].route, defaults[1].route))
                    .label("no `hosts` to tell them apart")
                    .related(defaults[0].span.clone(), format!("`{}` listens here", defaults[0].route))
                    .hint("give one of them `hosts = [\"name.example.com\"]` (the route without `hosts` gets every other host), or its own address"),
            );
        }
        let mut seen: BTreeMap<&str, (&str, Range<usize>)> = BTreeMap::new();
        for l in &group {
            for (host, span) in &l.hosts {
                if let Some((route, first)) = seen.get(host.as_str()) {
                    ctx.push(
                        Diagnostic::new(
                            span.clone(),
                            format!(
                                "host `{host}` on {addr} is claimed by routes `{route}` and `{}`",
                                l.route
                            ),
                        )
                        .label("claimed twice")
                        .related(first.clone(), format!("`{route}` claims it here"))
                        .hint("each host of an address goes to one route"),
                    );
                } else {
                    seen.insert(host, (&l.route, span.clone()));
                }
            }
        }
        if let Some(l) = group
            .iter()
            .find(|l| l.max_connections != first.max_connections)
        {
            ctx.push(
                Diagnostic::new(
                    l.span.clone(),
                    format!(
                        "routes `{}` and `{}` share {addr} with different `max_connections`",
                        first.route, l.route
                    ),
                )
                .label("one listener, one limit")
                .related(
                    first.span.clone(),
                    format!("`{}` listens here", first.route),
                )
                .hint("give the routes of one address the same `max_connections`"),
            );
        }
    }
}

pub(crate) fn protocol(
    ctx: &mut Ctx,
    text: &str,
    span: Range<usize>,
    path: &str,
) -> Option<Protocol> {
    match text {
        "http" => Some(Protocol::Http),
        "tcp" => Some(Protocol::Tcp),
        _ => {
            ctx.push(
                Diagnostic::new(
                    span,
                    format!("`{path}` must be \"http\" or \"tcp\", not \"{text}\""),
                )
                .label("unknown protocol")
                .hint("use \"http\" for HTTP/1.1 and HTTP/2, \"tcp\" for anything else"),
            );
            None
        }
    }
}

fn read_runtime(ctx: &mut Ctx, root: &Table<'_, '_>) -> Option<Runtime> {
    let default = Runtime {
        driver: Driver::Sandbox,
    };
    let Some(v) = root.get("runtime") else {
        return Some(default);
    };
    let t = Table::of(ctx, v, "runtime".into())?;
    t.deny_unknown(ctx, RUNTIME_KEYS);
    let Some((d, span)) = t.str(ctx, "driver") else {
        return Some(default);
    };
    let driver = match d.as_str() {
        "sandbox" => Driver::Sandbox,
        "docker" => Driver::Docker,
        "oci" => Driver::Oci,
        "process" => Driver::Process,
        _ => {
            let known = ["sandbox", "docker", "oci", "process"];
            let mut diag = Diagnostic::new(span, format!("unknown runtime driver \"{d}\""))
                .label("unknown driver");
            diag = match crate::read::suggest(&d, known) {
                Some(k) => diag.hint(format!("did you mean \"{k}\"?")),
                None => diag.hint(
                    "use \"sandbox\" (built in), \"docker\", \"oci\" (crun/runc) or \"process\"",
                ),
            };
            ctx.push(diag);
            return None;
        }
    };
    Some(Runtime { driver })
}

fn read_policy(ctx: &mut Ctx, root: &Table<'_, '_>) -> Option<Policy> {
    let mut policy = Policy {
        require_signed: false,
        trusted_keys: Vec::new(),
        keep_generations: None,
    };
    let Some(v) = root.get("policy") else {
        return Some(policy);
    };
    let t = Table::of(ctx, v, "policy".into())?;
    t.deny_unknown(ctx, POLICY_KEYS);
    policy.require_signed = t.bool(ctx, "require_signed").unwrap_or(false);
    for (key, span) in t.strings(ctx, "trusted_keys").unwrap_or_default() {
        if check::host_path(ctx, "trusted key", &key, span) {
            policy.trusted_keys.push(key);
        }
    }
    policy.keep_generations = t
        .int(ctx, "keep_generations", 1, 1_000_000)
        .map(|n| n as u32);
    let listed = t
        .get("trusted_keys")
        .and_then(|v| v.get_ref().as_array())
        .map_or(0, |a| a.len());
    if policy.require_signed && policy.trusted_keys.is_empty() && listed == 0 {
        ctx.push(
            Diagnostic::new(
                t.key_span("require_signed").unwrap_or(0..0),
                "`require_signed = true` but no key is trusted",
            )
            .label("no image could ever pass")
            .hint(
                "add `trusted_keys = [\"keys/release.pub\"]` (make one with `kiln key generate`)",
            ),
        );
    }
    Some(policy)
}

/// Strategy defaults used when `deploy.strategy` is absent.
pub(crate) fn default_strategy(exclusive: bool) -> Strategy {
    if exclusive {
        Strategy::Recreate
    } else {
        Strategy::Rolling {
            max_surge: 1,
            max_unavailable: 0,
        }
    }
}
