//! The commands that talk to the daemon: `daemon`, `up`, `apply`,
//! `rollback`, `status`, `logs`, `events`, `verify`, `down`.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use kiln_engine::api::{Reply, Request, SOCKET_FILE, Status};
use kiln_engine::client::Client;
use kiln_engine::{EngineOptions, Generation, Project};
use kiln_plan::render::render_plan;
use kiln_spec::model::SecretSource;

use crate::Outcome;
use crate::output::print_json;

/// How often every instance is checked for drift, unless `KILN_DRIFT_INTERVAL`
/// (seconds) says otherwise.
const DRIFT_INTERVAL: Duration = Duration::from_secs(10);

fn options(project: &Project, takeover: bool) -> EngineOptions {
    let drift_interval = std::env::var("KILN_DRIFT_INTERVAL")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| *s > 0.0)
        .map_or(DRIFT_INTERVAL, Duration::from_secs_f64);
    EngineOptions {
        project_name: project.spec.project.name.clone(),
        project_dir: std::path::absolute(&project.dir).unwrap_or_else(|_| project.dir.clone()),
        state_dir: std::path::absolute(project.state_dir()).unwrap_or_else(|_| project.state_dir()),
        image_store_dir: std::path::absolute(project.image_store_dir())
            .unwrap_or_else(|_| project.image_store_dir()),
        driver: project.spec.runtime.driver,
        fake: None,
        drift_interval,
        takeover,
    }
}

fn client_for(project: &Project) -> Client {
    Client::new(project.state_dir().join(SOCKET_FILE))
}

/// The client of the daemon for the project at `path`; loads only what is
/// needed to find the state directory.
fn client_at(path: &Path) -> anyhow::Result<Client> {
    let project = Project::load(path)?;
    Ok(client_for(&project))
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// `kiln daemon`: the engine in the foreground until SIGTERM/SIGINT, which
/// leave instances running (the next daemon adopts them).
pub fn daemon(path: &Path, takeover: bool) -> anyhow::Result<Outcome> {
    let project = Project::load(path)?;
    let opts = options(&project, takeover);
    runtime()?.block_on(async move {
        let engine = kiln_engine::server::serve(opts).await?;
        eprintln!(
            "kiln daemon: serving {} on {} (driver {})",
            project.spec.project.name,
            project.state_dir().join(SOCKET_FILE).display(),
            engine.driver_name()
        );
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => engine.stop(false).await,
            _ = term.recv() => engine.stop(false).await,
            () = engine.stopped() => {}
        }
        // Let the last replies (of `kiln down`) reach their client, and
        // after a handover the proxied connections finish.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while engine.proxy().busy() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        anyhow::Ok(())
    })?;
    Ok(Outcome::Success)
}

/// Starts `kiln daemon` in the background for `project` and waits for it.
fn spawn_daemon(project: &Project) -> anyhow::Result<Client> {
    let client = client_for(project);
    let state = project.state_dir();
    std::fs::create_dir_all(&state)
        .with_context(|| format!("cannot create {}", state.display()))?;
    let log_path = state.join("daemon.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open {}", log_path.display()))?;
    let exe = std::env::current_exe().context("cannot find the kiln binary")?;
    let mut child = {
        use std::os::unix::process::CommandExt;
        Command::new(exe)
            .arg("daemon")
            .arg(&project.spec_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .context("cannot start the kiln daemon")?
    };
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(60) {
        if client.is_up() {
            eprintln!(
                "Started the kiln daemon (pid {}, log {}).",
                child.id(),
                log_path.display()
            );
            return Ok(client);
        }
        if let Some(status) = child.try_wait()? {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(10).collect();
            bail!(
                "the kiln daemon exited ({status}) before it answered:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!(
        "the kiln daemon did not answer within 60 s\n  hint: see {}",
        log_path.display()
    )
}

/// The values of the generation's `env:` secrets, read here (the daemon's
/// environment may lack them) and sent over the 0600 socket.
fn env_secrets(generation: &Generation) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for service in generation.spec.services.values() {
        for source in service.secrets.values() {
            if let SecretSource::Env(var) = source
                && let Ok(value) = std::env::var(var)
            {
                out.insert(kiln_plan::generation::secret_key(source), value);
            }
        }
    }
    out
}

/// Prints replies until the last; returns its exit code.
fn follow(replies: kiln_engine::client::Replies, json: bool) -> anyhow::Result<i32> {
    let mut code = 0;
    let mut ended = false;
    for reply in replies {
        let reply = reply?;
        ended = matches!(reply, Reply::Done { .. } | Reply::Failed { .. });
        if json {
            println!("{}", serde_json::to_string(&reply)?);
        }
        match reply {
            Reply::Progress { message } if !json => println!("{message}"),
            Reply::Done { message, .. } if !json && !message.is_empty() => println!("{message}"),
            Reply::Failed { message, code: c } => {
                if !json {
                    eprintln!("error: {message}");
                }
                code = c;
            }
            Reply::Event { event } if !json => print_event(&event),
            Reply::Log { text, instance, .. } if !json => {
                for line in text.lines() {
                    println!("{instance} | {line}");
                }
            }
            _ => {}
        }
        let _ = std::io::stdout().flush();
    }
    if !ended {
        bail!(
            "the daemon stopped answering before the action ended (it may have crashed)\n  hint: `kiln status` and `kiln events` show where it stands; a restarted daemon finishes or reverts an interrupted rollout"
        );
    }
    Ok(code)
}

fn print_event(e: &kiln_engine::api::EventView) {
    println!("{}  {:<22} {}", e.at, e.kind, e.message);
}

fn outcome(code: i32) -> Outcome {
    if code == 0 {
        Outcome::Success
    } else {
        Outcome::Code(u8::try_from(code).unwrap_or(1))
    }
}

/// `kiln apply`: resolve, show the plan, confirm, roll out.
pub fn apply(
    path: &Path,
    yes: bool,
    wait: bool,
    message: Option<String>,
    color: bool,
) -> anyhow::Result<Outcome> {
    let project = Project::load(path)?;
    let generation = project.generation()?;
    let client = if client_for(&project).is_up() {
        client_for(&project)
    } else {
        spawn_daemon(&project)?
    };
    let mut plan = None;
    for reply in client.call(&Request::Plan {
        generation: Box::new(generation.clone()),
    })? {
        match reply? {
            Reply::Plan { plan: p, .. } => plan = Some(p),
            Reply::Failed { message, code } => {
                eprintln!("error: {message}");
                return Ok(outcome(code));
            }
            _ => {}
        }
    }
    let plan = plan.context("the daemon sent no plan")?;
    print!("{}", render_plan(&plan, color));
    if plan.is_empty() {
        // Nothing runs differently, but a new spec (e.g. only a health
        // policy changed) is still recorded as a generation.
    } else if !yes {
        // A terminal is asked; piped input may answer `yes` too (like
        // terraform), and no answer at all is refused with the way out.
        let terminal = std::io::stdin().is_terminal();
        if terminal {
            print!("\nApply this plan? Only `yes` is accepted: ");
            std::io::stdout().flush()?;
        }
        let mut answer = String::new();
        let read = std::io::stdin().read_line(&mut answer)?;
        if read == 0 && !terminal {
            bail!(
                "refusing to apply without confirmation: no answer on stdin\n  hint: pass -y to apply without asking"
            );
        }
        if answer.trim() != "yes" {
            println!("Apply cancelled.");
            return Ok(Outcome::Success);
        }
    }
    let replies = client.call(&Request::Apply {
        secrets: env_secrets(&generation),
        generation: Box::new(generation),
        message,
        wait,
    })?;
    Ok(outcome(follow(replies, false)?))
}

/// `kiln up`: apply, then follow events. Runs the engine in this process
/// when no daemon serves the project; Ctrl-C then stops every instance.
pub fn up(path: &Path, color: bool) -> anyhow::Result<Outcome> {
    let project = Project::load(path)?;
    let generation = project.generation()?;
    let client = client_for(&project);
    if client.is_up() {
        eprintln!(
            "A kiln daemon serves this project; applying through it (Ctrl-C stops following, not the instances)."
        );
        let code = follow(
            client.call(&Request::Apply {
                secrets: env_secrets(&generation),
                generation: Box::new(generation),
                message: Some("kiln up".into()),
                wait: true,
            })?,
            false,
        )?;
        if code != 0 {
            return Ok(outcome(code));
        }
        follow(
            client.call(&Request::Events {
                follow: true,
                since: Some(u64::MAX - 1),
            })?,
            false,
        )?;
        return Ok(Outcome::Success);
    }
    let opts = options(&project, false);
    let secrets = env_secrets(&generation);
    let code = runtime()?.block_on(async move {
        let engine = kiln_engine::server::serve(opts).await?;
        eprintln!(
            "kiln up: engine running in the foreground (driver {}); Ctrl-C stops every instance.",
            engine.driver_name()
        );
        if let Some(w) = engine.status().await.ok().and_then(|s| s.driver_warning) {
            eprintln!("warning: {w}");
        }
        let plan = engine.plan_for(&generation)?;
        print!("{}", render_plan(&plan, color));
        let mut events = engine.subscribe_events();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let printer = tokio::spawn(async move {
            while let Some(Reply::Progress { message }) = rx.recv().await {
                println!("{message}");
            }
        });
        let result = engine
            .apply(generation, secrets, Some("kiln up".into()), true, &tx)
            .await;
        drop(tx);
        let _ = printer.await;
        let code = match result {
            Ok(Reply::Done { message, .. }) => {
                println!("{message}");
                0
            }
            Ok(_) => 0,
            Err(refusal) => {
                eprintln!("error: {}", refusal.message);
                refusal.code
            }
        };
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        loop {
            tokio::select! {
                e = events.recv() => match e {
                    Ok(mut e) => {
                        if e.at.is_empty() {
                            e.at = now_text();
                        }
                        print_event(&e);
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(_) => break,
                },
                _ = tokio::signal::ctrl_c() => {
                    eprintln!("\nStopping every instance…");
                    engine.stop(true).await;
                    break;
                }
                _ = term.recv() => {
                    engine.stop(true).await;
                    break;
                }
                () = engine.stopped() => break,
            }
        }
        anyhow::Ok(code)
    })?;
    Ok(outcome(code))
}

fn now_text() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    kiln_image::config::rfc3339(now.as_secs())
}

pub fn rollback(path: &Path, to: Option<u64>, wait: bool) -> anyhow::Result<Outcome> {
    let client = client_at(path)?;
    Ok(outcome(follow(
        client.call(&Request::Rollback { to, wait })?,
        false,
    )?))
}

pub fn status(path: &Path, json: bool) -> anyhow::Result<Outcome> {
    let client = client_at(path)?;
    for reply in client.call(&Request::Status)? {
        match reply? {
            Reply::Status { status } => {
                if json {
                    print_json(&status);
                } else {
                    print_status(&status);
                }
            }
            Reply::Failed { message, code } => {
                eprintln!("error: {message}");
                return Ok(outcome(code));
            }
            _ => {}
        }
    }
    Ok(Outcome::Success)
}

fn print_status(s: &Status) {
    let generation = s.active_generation.map_or_else(
        || "none active".to_owned(),
        |g| format!("generation {g} active"),
    );
    let rolling = s
        .rolling_out
        .map_or_else(String::new, |g| format!(" · generation {g} rolling out"));
    println!(
        "Project {} · {generation}{rolling} · driver {} · daemon pid {}",
        s.project, s.driver, s.daemon_pid
    );
    if let Some(w) = &s.driver_warning {
        println!("warning: {w}");
    }
    println!();
    let mut rows = vec![[
        "SERVICE".to_owned(),
        "INSTANCE".to_owned(),
        "GEN".to_owned(),
        "STATUS".to_owned(),
        "TRAFFIC".to_owned(),
        "PORTS".to_owned(),
        "PID".to_owned(),
    ]];
    for svc in &s.services {
        if svc.instances.is_empty() {
            rows.push([
                svc.name.clone(),
                "-".into(),
                "-".into(),
                format!("0/{} healthy", svc.replicas),
                "-".into(),
                "-".into(),
                "-".into(),
            ]);
        }
        for i in &svc.instances {
            rows.push([
                format!("{} ({}/{})", svc.name, svc.healthy, svc.replicas),
                i.id.clone(),
                i.generation.to_string(),
                i.status.clone(),
                if i.in_rotation { "yes" } else { "no" }.into(),
                i.ports
                    .iter()
                    .map(|(n, p)| format!("{n}={p}"))
                    .collect::<Vec<_>>()
                    .join(","),
                i.pid.map_or_else(|| "-".into(), |p| p.to_string()),
            ]);
        }
    }
    print_table(&rows);
    if !s.routes.is_empty() {
        println!();
        let mut rows = vec![[
            "ROUTE".to_owned(),
            "LISTEN".to_owned(),
            "SERVICE".to_owned(),
            "BACKENDS".to_owned(),
        ]];
        for r in &s.routes {
            let backends: Vec<String> = r
                .backends
                .iter()
                .map(|(id, _, w)| format!("{id} {}%", f64::from(*w) / 100.0))
                .collect();
            // Routes sharing an address: which hosts each one serves.
            let listen = if r.hosts.is_empty() {
                r.listen.clone()
            } else {
                format!("{} ({})", r.listen, r.hosts.join(", "))
            };
            rows.push([
                r.name.clone(),
                listen,
                r.service.clone(),
                if backends.is_empty() {
                    "none".into()
                } else {
                    backends.join(", ")
                },
            ]);
        }
        print_table(&rows);
    }
    if let Some(i) = s.services.iter().flat_map(|s| &s.instances).next()
        && !i.isolation.is_empty()
    {
        println!("\nIsolation: {}", i.isolation);
    }
}

fn print_table<const N: usize>(rows: &[[String; N]]) {
    let mut widths = [0; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in rows {
        let mut line = String::new();
        for (i, (w, cell)) in widths.iter().zip(row).enumerate() {
            if i + 1 == N {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  ", w = *w));
            }
        }
        println!("{}", line.trim_end());
    }
}

pub fn logs(path: &Path, service: &str, follow_logs: bool, tail: u64) -> anyhow::Result<Outcome> {
    let client = client_at(path)?;
    let replies = client.call(&Request::Logs {
        service: service.to_owned(),
        follow: follow_logs,
        tail,
    })?;
    Ok(outcome(follow(replies, false)?))
}

pub fn events(path: &Path, follow_events: bool, json: bool) -> anyhow::Result<Outcome> {
    let client = client_at(path)?;
    let replies = client.call(&Request::Events {
        follow: follow_events,
        since: None,
    })?;
    if json {
        for reply in replies {
            if let Reply::Event { event } = reply? {
                println!("{}", serde_json::to_string(&event)?);
            }
        }
        return Ok(Outcome::Success);
    }
    Ok(outcome(follow(replies, false)?))
}

pub fn verify(path: &Path, json: bool) -> anyhow::Result<Outcome> {
    let client = client_at(path)?;
    let mut code = 0;
    for reply in client.call(&Request::Verify)? {
        match reply? {
            Reply::Drift { findings } => {
                if json {
                    print_json(&findings);
                } else if !findings.is_empty() {
                    println!("Drift found:");
                    for f in &findings {
                        println!("  {}: {} ({})", f.subject, f.what, f.action);
                    }
                }
            }
            Reply::Done { message, .. } if !json => println!("{message}"),
            Reply::Failed { code: c, .. } => code = c,
            _ => {}
        }
    }
    Ok(outcome(code))
}

pub fn down(path: &Path) -> anyhow::Result<Outcome> {
    let client = client_at(path)?;
    if !client.is_up() {
        println!("No kiln daemon serves this project.");
        return Ok(Outcome::Success);
    }
    let code = follow(client.call(&Request::Down)?, false)?;
    // Wait for the socket to go away, so a following `kiln up` starts clean.
    let started = Instant::now();
    while client.is_up() && started.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(outcome(code))
}
