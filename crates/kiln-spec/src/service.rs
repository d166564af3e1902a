//! `[service.NAME]`: reading, defaults, and the checks that span services
//! (who claims which volume, which volumes are exclusive).

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;

use toml::de::DeValue;

use crate::check;
use crate::diag::Diagnostic;
use crate::model::{
    Backup, Deploy, DriftPolicy, Duration, Health, HealthCheck, Port, Protocol, Resources,
    SecretSource, Service, Strategy, Volume, VolumeMount,
};
use crate::read::{Ctx, Table, suggest};
use crate::validate::{default_strategy, protocol};

pub(crate) const SERVICE_KEYS: &[&str] = &[
    "image",
    "replicas",
    "command",
    "env",
    "files",
    "secrets",
    "volumes",
    "ports",
    "health",
    "deploy",
    "resources",
    "drift",
    "stop_grace",
    "backup",
];
pub(crate) const BACKUP_KEYS: &[&str] = &["command", "timeout"];
pub(crate) const PORT_KEYS: &[&str] = &["protocol", "container"];
pub(crate) const MOUNT_KEYS: &[&str] = &["volume", "read_only"];
pub(crate) const SECRET_KEYS: &[&str] = &["file", "env"];
pub(crate) const HEALTH_KEYS: &[&str] = &[
    "http",
    "tcp",
    "exec",
    "port",
    "interval",
    "timeout",
    "healthy",
    "unhealthy",
    "start_period",
];
pub(crate) const DEPLOY_KEYS: &[&str] = &[
    "strategy",
    "max_surge",
    "max_unavailable",
    "steps",
    "hold",
    "deadline",
    "drain_timeout",
];
pub(crate) const RESOURCE_KEYS: &[&str] = &["memory", "cpus", "pids"];

/// Variables kiln sets in every instance.
pub const KILN_VARS: &[&str] = &["KILN_SERVICE", "KILN_INSTANCE", "KILN_GENERATION"];

/// Who mounts which volume, gathered while reading services.
#[derive(Debug, Default)]
pub(crate) struct Claims {
    /// volume → (service, mount span, read-only)
    pub mounts: BTreeMap<String, Vec<(String, Range<usize>, bool)>>,
    /// service → span of an explicit `deploy.strategy`
    pub explicit_strategy: BTreeMap<String, Range<usize>>,
    /// service → span of a rolling-only key given without a strategy (it
    /// would be ignored if an exclusive volume forces `recreate`)
    pub implicit_rolling_keys: BTreeMap<String, (String, Range<usize>)>,
}

pub(crate) fn read_service(
    ctx: &mut Ctx,
    name: &str,
    t: &Table<'_, '_>,
    images: &BTreeSet<String>,
    volumes: &BTreeSet<String>,
    claims: &mut Claims,
) -> Option<Service> {
    t.deny_unknown(ctx, SERVICE_KEYS);
    let image = match t.str(ctx, "image") {
        Some((text, span)) => check::image_source(ctx, &text, span, images, false),
        None => {
            if t.get("image").is_none() {
                let hint = match images.iter().next() {
                    Some(first) => format!("add `image = \"{first}\"` (an [image.NAME] of this file) or a `sha256:…` digest"),
                    None => "declare an [image.NAME] and add `image = \"NAME\"`, or use a `sha256:…` digest".to_owned(),
                };
                t.missing(ctx, "image", &hint);
            }
            None
        }
    };
    let replicas = t.int(ctx, "replicas", 0, 1000).map_or(1, |n| n as u32);
    let command = t.strings(ctx, "command");
    if command.as_ref().is_some_and(Vec::is_empty) {
        ctx.push(
            Diagnostic::new(
                t.get("command").map_or(t.span.clone(), |v| v.span()),
                format!("`service.{name}.command` cannot be empty"),
            )
            .label("empty command")
            .hint("leave `command` out to run the image's entrypoint"),
        );
    }

    let ports = read_ports(ctx, t);
    let mut env = BTreeMap::new();
    let mut env_spans = Vec::new();
    for (k, (v, kspan, vspan)) in t.string_map(ctx, "env") {
        if !check::env_name(ctx, "environment variable", &k, kspan.clone()) {
            continue;
        }
        if is_reserved(&k) {
            ctx.push(reserved(&k, kspan));
            continue;
        }
        env_spans.push((v.clone(), vspan));
        env.insert(k, v);
    }
    let secrets = read_secrets(ctx, t, &env);

    // What `${VAR}` may refer to in command, env values and exec checks.
    let mut known: BTreeSet<String> = env.keys().chain(secrets.keys()).cloned().collect();
    known.extend(KILN_VARS.iter().map(|s| s.to_string()));
    known.extend(ports.keys().map(|p| check::port_var(p)));
    if ports.len() == 1 || ports.contains_key("http") {
        known.insert("PORT".into());
    }
    for (arg, span) in command.iter().flatten() {
        check::references(ctx, arg, span.clone(), &known);
    }
    for (value, span) in &env_spans {
        check::references(ctx, value, span.clone(), &known);
    }

    let mut files = BTreeMap::new();
    for (dst, (src, dspan, sspan)) in t.string_map(ctx, "files") {
        let ok = check::container_path(ctx, "file destination", &dst, dspan)
            & check::host_path(ctx, "file source", &src, sspan);
        if ok {
            files.insert(dst, src);
        }
    }

    let mounts = read_mounts(ctx, name, t, volumes, claims);
    for (dst, span) in files.keys().zip(std::iter::repeat(t.span.clone())) {
        if let Some(vol) = mounts.keys().find(|m| {
            *m == dst || dst.starts_with(&format!("{m}/")) || m.starts_with(&format!("{dst}/"))
        }) {
            ctx.push(
                Diagnostic::new(
                    t.key_span("files").unwrap_or(span),
                    format!("file `{dst}` would be hidden by the volume mounted at `{vol}`"),
                )
                .label("overlapping mount")
                .hint("mount config files outside volume paths"),
            );
        }
    }

    let health = read_health(ctx, t, &ports, &known);
    let deploy = read_deploy(ctx, name, t, replicas, claims);
    let resources = read_resources(ctx, t);
    let drift = match t.str(ctx, "drift") {
        None => Some(DriftPolicy::Replace),
        Some((d, _)) if d == "replace" => Some(DriftPolicy::Replace),
        Some((d, _)) if d == "report" => Some(DriftPolicy::Report),
        Some((d, span)) => {
            ctx.push(
                Diagnostic::new(span, format!("`service.{name}.drift` must be \"replace\" or \"report\", not \"{d}\""))
                    .label("unknown drift policy")
                    .hint("\"replace\" heals drifted instances by replacement; \"report\" only reports them"),
            );
            None
        }
    };
    let stop_grace = t
        .duration(ctx, "stop_grace")
        .unwrap_or(Duration::from_secs(10));
    let backup = read_backup(ctx, name, t, &mounts);
    Some(Service {
        image: image?,
        replicas,
        command: command.map(|c| c.into_iter().map(|(s, _)| s).collect()),
        env,
        files,
        secrets,
        volumes: mounts,
        ports,
        health,
        deploy: deploy?,
        resources: resources?,
        drift: drift?,
        stop_grace,
        backup,
    })
}

/// `[service.NAME.backup]`: a command and a timeout; the service must write
/// a volume, or there is nothing to back up.
fn read_backup(
    ctx: &mut Ctx,
    name: &str,
    t: &Table<'_, '_>,
    mounts: &BTreeMap<String, VolumeMount>,
) -> Option<Backup> {
    let v = t.get("backup")?;
    let b = Table::of(ctx, v, t.child_path("backup"))?;
    b.deny_unknown(ctx, BACKUP_KEYS);
    let command = b.strings(ctx, "command");
    if b.get("command").is_none() {
        b.missing(
            ctx,
            "command",
            "name the program whose standard output is the backup, like [\"tar\", \"-C\", \"/data\", \"-cf\", \"-\", \".\"]",
        );
    }
    let timeout = b
        .duration(ctx, "timeout")
        .unwrap_or(Duration::from_secs(600));
    let command = command?;
    if command.is_empty() {
        ctx.push(
            Diagnostic::new(
                b.key_span("command").unwrap_or(b.span.clone()),
                format!("`service.{name}.backup.command` cannot be empty"),
            )
            .label("empty")
            .hint("name the program whose standard output is the backup"),
        );
        return None;
    }
    if !mounts.values().any(|m| !m.read_only) {
        ctx.push(
            Diagnostic::new(b.span.clone(), format!("service `{name}` has a backup but writes no volume"))
                .label("nothing to back up")
                .hint("mount the volume the backup reads: volumes = { \"/data\" = \"data\" }, or remove [service.NAME.backup]"),
        );
        return None;
    }
    Some(Backup {
        command: command.into_iter().map(|(s, _)| s).collect(),
        timeout,
    })
}

/// Variables kiln sets itself, which neither `env` nor `secrets` may name.
pub(crate) fn is_reserved(var: &str) -> bool {
    var == "PORT" || var.starts_with("PORT_") || KILN_VARS.contains(&var)
}

pub(crate) fn reserved(var: &str, span: Range<usize>) -> Diagnostic {
    Diagnostic::new(
        span,
        format!("`{var}` is set by kiln and cannot be overridden"),
    )
    .label("reserved variable")
    .hint("kiln passes each port as PORT_<NAME> (and PORT); pick another name")
}

fn read_ports(ctx: &mut Ctx, t: &Table<'_, '_>) -> BTreeMap<String, Port> {
    let mut ports = BTreeMap::new();
    let Some(v) = t.get("ports") else {
        return ports;
    };
    let Some(pt) = Table::of(ctx, v, t.child_path("ports")) else {
        return ports;
    };
    for (pname, pspan, pv) in pt.iter() {
        if !check::name(ctx, "port", pname, pspan) {
            continue;
        }
        let Some(p) = Table::of(ctx, pv, pt.child_path(pname)) else {
            continue;
        };
        p.deny_unknown(ctx, PORT_KEYS);
        let proto = match p.str(ctx, "protocol") {
            Some((text, span)) => protocol(ctx, &text, span, &p.child_path("protocol")),
            None => Some(Protocol::Http),
        };
        let container = p.int(ctx, "container", 1, 65535).map(|n| n as u16);
        if let Some(protocol) = proto {
            ports.insert(
                pname.to_owned(),
                Port {
                    protocol,
                    container,
                },
            );
        }
    }
    ports
}

fn read_secrets(
    ctx: &mut Ctx,
    t: &Table<'_, '_>,
    env: &BTreeMap<String, String>,
) -> BTreeMap<String, SecretSource> {
    let mut secrets = BTreeMap::new();
    let Some(v) = t.get("secrets") else {
        return secrets;
    };
    let Some(st) = Table::of(ctx, v, t.child_path("secrets")) else {
        return secrets;
    };
    for (var, vspan, sv) in st.iter() {
        if !check::env_name(ctx, "secret", var, vspan.clone()) {
            continue;
        }
        if is_reserved(var) {
            ctx.push(reserved(var, vspan.clone()));
            continue;
        }
        if env.contains_key(var) {
            ctx.push(
                Diagnostic::new(
                    vspan.clone(),
                    format!("`{var}` is both in `env` and in `secrets`"),
                )
                .label("declared twice")
                .hint("keep the secret and remove it from `env`"),
            );
            continue;
        }
        let Some(s) = Table::of(ctx, sv, st.child_path(var)) else {
            continue;
        };
        s.deny_unknown(ctx, SECRET_KEYS);
        let file = s.str(ctx, "file");
        let env_var = s.str(ctx, "env");
        let source = match (file, env_var) {
            (Some((f, span)), None) => {
                check::host_path(ctx, "secret file", &f, span).then_some(SecretSource::File(f))
            }
            (None, Some((e, span))) => check::env_name(ctx, "environment variable", &e, span)
                .then_some(SecretSource::Env(e)),
            (Some(_), Some(_)) => {
                ctx.push(
                    Diagnostic::new(
                        sv.span(),
                        format!("secret `{var}` has both `file` and `env`"),
                    )
                    .label("two sources")
                    .hint("a secret comes from one place: keep `file` or `env`"),
                );
                None
            }
            (None, None) => {
                if s.get("file").is_none() && s.get("env").is_none() {
                    ctx.push(
                        Diagnostic::new(sv.span(), format!("secret `{var}` says nowhere to read its value from"))
                            .label("no source")
                            .hint(format!("write `{var} = {{ file = \".secrets/{}\" }}` or `{{ env = \"{var}\" }}`", var.to_ascii_lowercase())),
                    );
                }
                None
            }
        };
        if let Some(source) = source {
            secrets.insert(var.to_owned(), source);
        }
    }
    secrets
}

fn read_mounts(
    ctx: &mut Ctx,
    service: &str,
    t: &Table<'_, '_>,
    volumes: &BTreeSet<String>,
    claims: &mut Claims,
) -> BTreeMap<String, VolumeMount> {
    let mut mounts = BTreeMap::new();
    let Some(v) = t.get("volumes") else {
        return mounts;
    };
    let Some(vt) = Table::of(ctx, v, t.child_path("volumes")) else {
        return mounts;
    };
    for (path, pspan, mv) in vt.iter() {
        let path_ok = check::container_path(ctx, "volume mount point", path, pspan);
        let (volume, vspan, read_only) = match mv.get_ref() {
            DeValue::String(s) => (s.to_string(), mv.span(), false),
            DeValue::Table(_) => {
                let Some(m) = Table::of(ctx, mv, vt.child_path(path)) else {
                    continue;
                };
                m.deny_unknown(ctx, MOUNT_KEYS);
                let ro = m.bool(ctx, "read_only").unwrap_or(false);
                match m.str(ctx, "volume") {
                    Some((s, span)) => (s, span, ro),
                    None => {
                        if m.get("volume").is_none() {
                            m.missing(ctx, "volume", "name the [volume.NAME] to mount here");
                        }
                        continue;
                    }
                }
            }
            _ => {
                ctx.expected(
                    mv,
                    "a volume name or { volume, read_only }",
                    &vt.child_path(path),
                );
                continue;
            }
        };
        if !volumes.contains(&volume) {
            let mut d = Diagnostic::new(vspan, format!("volume `{volume}` is not declared"))
                .label("unknown volume");
            d = match suggest(&volume, volumes.iter().map(String::as_str)) {
                Some(k) => d.hint(format!("did you mean `{k}`?")),
                None => d.hint(format!("declare it with a [volume.{volume}] table")),
            };
            ctx.push(d);
            continue;
        }
        if !path_ok {
            continue;
        }
        claims.mounts.entry(volume.clone()).or_default().push((
            service.to_owned(),
            vspan,
            read_only,
        ));
        mounts.insert(path.to_owned(), VolumeMount { volume, read_only });
    }
    mounts
}

fn read_health(
    ctx: &mut Ctx,
    t: &Table<'_, '_>,
    ports: &BTreeMap<String, Port>,
    known: &BTreeSet<String>,
) -> Option<Health> {
    let v = t.get("health")?;
    let h = Table::of(ctx, v, t.child_path("health"))?;
    h.deny_unknown(ctx, HEALTH_KEYS);
    let kinds: Vec<&str> = ["http", "tcp", "exec"]
        .into_iter()
        .filter(|k| h.get(k).is_some())
        .collect();
    if kinds.len() != 1 {
        ctx.push(
            Diagnostic::new(
                v.span(),
                format!(
                    "`{}` needs exactly one check, found {}",
                    h.path,
                    kinds.len()
                ),
            )
            .label(if kinds.is_empty() {
                "no check".to_owned()
            } else {
                format!("{} given", kinds.join(" and "))
            })
            .hint("use one of: http = \"/healthz\", tcp = true, exec = [\"/bin/check\"]"),
        );
        return None;
    }
    let port = || -> Option<String> {
        match h.str(&mut Ctx::default(), "port") {
            Some((p, _)) => Some(p),
            None if ports.len() == 1 => ports.keys().next().cloned(),
            None => None,
        }
    };
    let check_port = |ctx: &mut Ctx| -> Option<String> {
        let p = port();
        if h.get("port").is_some() && h.str(ctx, "port").is_none() {
            return None;
        }
        match p {
            Some(p) if ports.contains_key(&p) => Some(p),
            Some(p) => {
                let span = h.get("port").map_or(h.span.clone(), |v| v.span());
                let mut d = Diagnostic::new(
                    span,
                    format!("health check port `{p}` is not a port of this service"),
                )
                .label("unknown port");
                d = match suggest(&p, ports.keys().map(String::as_str)) {
                    Some(k) => d.hint(format!("did you mean `{k}`?")),
                    None => d.hint(format!("declare it: ports = {{ {p} = {{}} }}")),
                };
                ctx.push(d);
                None
            }
            None => {
                ctx.push(
                    Diagnostic::new(
                        v.span(),
                        format!("`{}` must say which port to check", h.path),
                    )
                    .label("`port` is required here")
                    .hint(match ports.keys().next() {
                        Some(p) => format!("add `port = \"{p}\"`"),
                        None => "declare a port, like ports = { http = {} }, and name it in `port`"
                            .to_owned(),
                    }),
                );
                None
            }
        }
    };
    let check = match kinds[0] {
        "http" => {
            let path = h.str(ctx, "http");
            let port = check_port(ctx);
            let (path, span) = path?;
            if !path.starts_with('/') {
                ctx.push(
                    Diagnostic::new(
                        span,
                        format!("health check path `{path}` must start with `/`"),
                    )
                    .label("not a path")
                    .hint(format!("write \"/{}\"", path.trim_start_matches('/'))),
                );
                return None;
            }
            HealthCheck::Http { path, port: port? }
        }
        "tcp" => {
            let on = h.bool(ctx, "tcp")?;
            let port = check_port(ctx)?;
            if !on {
                ctx.push(
                    Diagnostic::new(h.get("tcp").map_or(h.span.clone(), |v| v.span()), "`tcp = false` turns the check off")
                        .label("no check")
                        .hint("remove the whole `health` table to run without a check, or write `tcp = true`"),
                );
                return None;
            }
            HealthCheck::Tcp { port }
        }
        _ => {
            if h.get("port").is_some() {
                check_port(ctx);
            }
            let cmd = h.strings(ctx, "exec")?;
            if cmd.is_empty() {
                ctx.push(
                    Diagnostic::new(
                        h.get("exec").map_or(h.span.clone(), |v| v.span()),
                        "`exec` check has no command",
                    )
                    .label("empty")
                    .hint("write exec = [\"/bin/check\", \"arg\"]"),
                );
                return None;
            }
            for (arg, span) in &cmd {
                check::references(ctx, arg, span.clone(), known);
            }
            HealthCheck::Exec {
                command: cmd.into_iter().map(|(s, _)| s).collect(),
            }
        }
    };
    let interval = h
        .duration(ctx, "interval")
        .unwrap_or(Duration::from_secs(5));
    let timeout = h
        .duration(ctx, "timeout")
        .unwrap_or(Duration::from_secs(2).min(interval));
    if interval.millis == 0 {
        ctx.push(
            Diagnostic::new(
                h.get("interval").map_or(h.span.clone(), |v| v.span()),
                "health check interval must be above zero",
            )
            .label("zero interval")
            .hint("write interval = \"1s\" or longer"),
        );
    }
    if timeout > interval || timeout.millis == 0 {
        ctx.push(
            Diagnostic::new(h.get("timeout").map_or(h.span.clone(), |v| v.span()), format!("health check timeout ({timeout}) must be above zero and at most the interval ({interval})"))
                .label("invalid timeout")
                .hint("checks must not overlap: make the timeout shorter than the interval"),
        );
    }
    Some(Health {
        check,
        interval,
        timeout,
        healthy: h.int(ctx, "healthy", 1, 100).map_or(1, |n| n as u32),
        unhealthy: h.int(ctx, "unhealthy", 1, 100).map_or(3, |n| n as u32),
        start_period: h
            .duration(ctx, "start_period")
            .unwrap_or(Duration::from_millis(0)),
    })
}

fn read_deploy(
    ctx: &mut Ctx,
    name: &str,
    t: &Table<'_, '_>,
    replicas: u32,
    claims: &mut Claims,
) -> Option<Deploy> {
    let mut deploy = Deploy {
        strategy: default_strategy(false),
        deadline: Duration::from_secs(60),
        drain_timeout: Duration::from_secs(30),
    };
    let Some(v) = t.get("deploy") else {
        return Some(deploy);
    };
    let d = Table::of(ctx, v, t.child_path("deploy"))?;
    d.deny_unknown(ctx, DEPLOY_KEYS);
    let strategy = d.str(ctx, "strategy");
    let kind = strategy.as_ref().map_or("rolling", |(s, _)| s.as_str());
    if let Some((_, span)) = &strategy {
        claims
            .explicit_strategy
            .insert(name.to_owned(), span.clone());
    }
    let only = |ctx: &mut Ctx, key: &str, for_: &str| {
        if kind != for_
            && let Some(span) = d.key_span(key)
        {
            ctx.push(
                Diagnostic::new(
                    span,
                    format!(
                        "`{key}` applies only to the {for_} strategy, and this service uses {kind}"
                    ),
                )
                .label("not used by this strategy")
                .hint(format!("remove `{key}`, or set strategy = \"{for_}\"")),
            );
        }
    };
    only(ctx, "max_surge", "rolling");
    only(ctx, "max_unavailable", "rolling");
    only(ctx, "steps", "canary");
    only(ctx, "hold", "canary");
    if strategy.is_none()
        && let Some((key, span)) = ["max_surge", "max_unavailable"]
            .iter()
            .find_map(|k| d.key_span(k).map(|s| (k.to_string(), s)))
    {
        claims
            .implicit_rolling_keys
            .insert(name.to_owned(), (key, span));
    }
    deploy.strategy = match kind {
        "rolling" => {
            let max_surge = d.int(ctx, "max_surge", 0, 1000).map_or(1, |n| n as u32);
            let max_unavailable = d
                .int(ctx, "max_unavailable", 0, 1000)
                .map_or(0, |n| n as u32);
            if max_surge == 0 && max_unavailable == 0 {
                ctx.push(
                    Diagnostic::new(d.key_span("max_surge").unwrap_or(v.span()), "a rolling deploy with max_surge = 0 and max_unavailable = 0 can never make progress")
                        .label("no room to replace anything")
                        .hint("allow one extra instance (max_surge = 1) or one missing (max_unavailable = 1)"),
                );
            }
            if replicas > 0 && max_unavailable >= replicas && d.get("max_unavailable").is_some() {
                ctx.push(
                    Diagnostic::new(d.get("max_unavailable").map_or(v.span(), |v| v.span()), format!("max_unavailable = {max_unavailable} would let all {replicas} replica{} go down at once", if replicas == 1 { "" } else { "s" }))
                        .label("no instance guaranteed")
                        .hint("use strategy = \"recreate\" if downtime is acceptable, or lower max_unavailable"),
                );
            }
            Strategy::Rolling {
                max_surge,
                max_unavailable,
            }
        }
        "blue-green" => Strategy::BlueGreen,
        "recreate" => Strategy::Recreate,
        "canary" => {
            let steps = read_canary_steps(ctx, &d);
            let hold = d.duration(ctx, "hold").unwrap_or(Duration::from_secs(30));
            Strategy::Canary {
                steps: steps?,
                hold,
            }
        }
        other => {
            let known = ["rolling", "blue-green", "canary", "recreate"];
            let (_, span) = strategy.clone().unwrap_or((String::new(), v.span()));
            let mut diag = Diagnostic::new(span, format!("unknown deploy strategy \"{other}\""))
                .label("unknown strategy");
            diag = match suggest(other, known) {
                Some(k) => diag.hint(format!("did you mean \"{k}\"?")),
                None => diag.hint("use \"rolling\", \"blue-green\", \"canary\" or \"recreate\""),
            };
            ctx.push(diag);
            return None;
        }
    };
    if let Some(deadline) = d.duration(ctx, "deadline") {
        if deadline.millis == 0 {
            ctx.push(
                Diagnostic::new(
                    d.get("deadline").map_or(v.span(), |v| v.span()),
                    "a deploy deadline of zero fails every rollout",
                )
                .label("zero deadline")
                .hint("give new instances time to become healthy, like deadline = \"60s\""),
            );
        }
        deploy.deadline = deadline;
    }
    if let Some(drain) = d.duration(ctx, "drain_timeout") {
        deploy.drain_timeout = drain;
    }
    Some(deploy)
}

fn read_canary_steps(ctx: &mut Ctx, d: &Table<'_, '_>) -> Option<Vec<u32>> {
    let Some(v) = d.get("steps") else {
        return Some(vec![10, 50]);
    };
    let DeValue::Array(items) = v.get_ref() else {
        ctx.expected(v, "an array of traffic percentages", &d.child_path("steps"));
        return None;
    };
    let mut steps = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let w = crate::read::int_value(ctx, item, &format!("{}.steps[{i}]", d.path), 1, 99)? as u32;
        if steps.last().is_some_and(|&last| w <= last) {
            ctx.push(
                Diagnostic::new(item.span(), "canary steps must increase")
                    .label(format!("{w}% after {}%", steps.last().unwrap_or(&0)))
                    .hint("list traffic percentages in increasing order, like [10, 50]; promotion to 100% follows the last"),
            );
            return None;
        }
        steps.push(w);
    }
    if steps.is_empty() {
        ctx.push(
            Diagnostic::new(v.span(), "a canary needs at least one step")
                .label("no steps")
                .hint("write steps = [10, 50]"),
        );
        return None;
    }
    Some(steps)
}

fn read_resources(ctx: &mut Ctx, t: &Table<'_, '_>) -> Option<Resources> {
    let mut r = Resources::default();
    let Some(v) = t.get("resources") else {
        return Some(r);
    };
    let rt = Table::of(ctx, v, t.child_path("resources"))?;
    rt.deny_unknown(ctx, RESOURCE_KEYS);
    r.memory = rt.size(ctx, "memory");
    if let Some(m) = r.memory
        && m.bytes < 4 << 20
    {
        ctx.push(
            Diagnostic::new(
                rt.get("memory").map_or(v.span(), |v| v.span()),
                format!("a memory limit of {m} is below what any process starts with"),
            )
            .label("too small")
            .hint("use at least \"4MiB\""),
        );
    }
    if let Some(c) = rt.get("cpus") {
        let path = rt.child_path("cpus");
        let value = match c.get_ref() {
            // A number that does not parse becomes NaN, which the range
            // check below refuses: it must never be dropped silently.
            DeValue::Float(f) => Some(f.as_str().parse::<f64>().unwrap_or(f64::NAN)),
            // `as_str` holds the digits in the integer's own radix (`0x10`
            // is "10" with radix 16), so read it with that radix.
            DeValue::Integer(i) => {
                Some(i64::from_str_radix(i.as_str(), i.radix()).map_or(f64::NAN, |n| n as f64))
            }
            _ => {
                ctx.expected(c, "a number of CPUs", &path);
                None
            }
        };
        if let Some(cpus) = value {
            let milli = (cpus * 1000.0).round();
            if !(1.0..=1_024_000.0).contains(&milli) || ((cpus * 1000.0) - milli).abs() > 1e-6 {
                ctx.push(
                    Diagnostic::new(
                        c.span(),
                        format!(
                            "`{path}` must be between 0.001 and 1024 with at most three decimals"
                        ),
                    )
                    .label("invalid CPU count")
                    .hint("write a share of CPUs, like 0.5 or 2"),
                );
            } else {
                r.millicpus = Some(milli as u32);
            }
        }
    }
    r.pids = rt.int(ctx, "pids", 1, 4_194_304).map(|n| n as u32);
    Some(r)
}

/// Volume checks that need every service: two services on one volume need
/// `shared`; an exclusive volume means one writer at a time, which only
/// `recreate` with at most one replica can guarantee.
pub(crate) fn check_volume_claims(
    ctx: &mut Ctx,
    claims: &Claims,
    volumes: &mut BTreeMap<String, Volume>,
    explicit_exclusive: &BTreeSet<String>,
    services: &mut BTreeMap<String, Service>,
) {
    for (vol, users) in &claims.mounts {
        let Some(volume) = volumes.get_mut(vol) else {
            continue;
        };
        let mut owners: Vec<&(String, Range<usize>, bool)> = Vec::new();
        for u in users {
            if owners.iter().all(|o| o.0 != u.0) {
                owners.push(u);
            }
        }
        if owners.len() > 1 && !volume.shared {
            let (first, first_span, _) = owners[0];
            for (svc, span, _) in &owners[1..] {
                ctx.push(
                    Diagnostic::new(span.clone(), format!("volume `{vol}` is claimed by `{first}` and `{svc}`"))
                        .label("second claim")
                        .related(first_span.clone(), format!("claimed by `{first}` here"))
                        .hint(format!("declare `shared = true` in [volume.{vol}] if both may use it, or give each service its own volume")),
                );
            }
        }
        let writers: Vec<&String> = users.iter().filter(|u| !u.2).map(|u| &u.0).collect();
        if !explicit_exclusive.contains(vol) && !volume.shared {
            volume.exclusive = !writers.is_empty()
                && writers
                    .iter()
                    .all(|s| services.get(*s).is_some_and(|s| s.replicas <= 1));
        }
        if !volume.exclusive {
            continue;
        }
        for (svc_name, span, read_only) in users {
            if *read_only {
                continue;
            }
            let Some(svc) = services.get_mut(svc_name) else {
                continue;
            };
            if svc.replicas > 1 {
                ctx.push(
                    Diagnostic::new(span.clone(), format!("service `{svc_name}` has {} replicas writing to exclusive volume `{vol}`", svc.replicas))
                        .label("more than one writer")
                        .hint(format!("an exclusive volume has one writer at a time: use replicas = 1, mount it read_only, or declare [volume.{vol}] exclusive = false")),
                );
                continue;
            }
            match claims.explicit_strategy.get(svc_name) {
                Some(sspan) if svc.deploy.strategy != Strategy::Recreate => {
                    ctx.push(
                        Diagnostic::new(sspan.clone(), format!("service `{svc_name}` writes to exclusive volume `{vol}`, so it must deploy with \"recreate\""))
                            .label(format!("{} would run two writers at once", svc.deploy.strategy.name()))
                            .related(span.clone(), "exclusive volume mounted here")
                            .hint(format!("set strategy = \"recreate\", or declare [volume.{vol}] exclusive = false if concurrent writers are safe")),
                    );
                }
                Some(_) => {}
                None => {
                    if let Some((key, kspan)) = claims.implicit_rolling_keys.get(svc_name) {
                        ctx.push(
                            Diagnostic::new(kspan.clone(), format!("`{key}` would be ignored: service `{svc_name}` writes to exclusive volume `{vol}`, so it deploys with \"recreate\""))
                                .label("applies only to rolling")
                                .related(span.clone(), "exclusive volume mounted here")
                                .hint(format!("remove `{key}` and write strategy = \"recreate\", or declare [volume.{vol}] exclusive = false")),
                        );
                    }
                    svc.deploy.strategy = Strategy::Recreate;
                }
            }
        }
    }
}
