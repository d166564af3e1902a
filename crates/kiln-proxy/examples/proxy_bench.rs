//! A standalone kiln proxy for benchmarks (`bench/proxy.sh`): one HTTP route
//! on `--listen` in front of the `--backend`s (weight 1 each, round-robin),
//! served by `--threads` proxy worker threads (as the daemon's proxy is, one
//! per core there). Runs until killed.
//!
//! ```sh
//! cargo build --release -p kiln-proxy --example proxy_bench
//! target/release/examples/proxy_bench --listen 127.0.0.1:18080 \
//!     --backend 127.0.0.1:18081 --threads 1
//! ```
//!
//! `main` runs a current-thread runtime that only configures the proxy,
//! like the engine's runtime does in the daemon; requests are served on the
//! proxy's own worker threads.

use std::net::SocketAddr;
use std::process::ExitCode;

use kiln_proxy::{Backend, Protocol, Proxy, RouteConfig};

const USAGE: &str = "usage: proxy_bench --listen ADDR --backend ADDR [--backend ADDR ...] \
                     [--threads N]";

struct Args {
    listen: SocketAddr,
    backends: Vec<SocketAddr>,
    threads: usize,
}

fn parse() -> Result<Args, String> {
    let mut listen = None;
    let mut backends = Vec::new();
    let mut threads = 1;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--listen" => {
                let v = value("--listen")?;
                listen = Some(v.parse().map_err(|e| format!("--listen {v}: {e}"))?);
            }
            "--backend" => {
                let v = value("--backend")?;
                backends.push(v.parse().map_err(|e| format!("--backend {v}: {e}"))?);
            }
            "--threads" => {
                let v = value("--threads")?;
                threads = v.parse().map_err(|e| format!("--threads {v}: {e}"))?;
                if threads == 0 {
                    return Err("--threads must be at least 1".to_owned());
                }
            }
            "-h" | "--help" => return Err(USAGE.to_owned()),
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    let listen = listen.ok_or(format!("--listen is required\n{USAGE}"))?;
    if backends.is_empty() {
        return Err(format!("at least one --backend is required\n{USAGE}"));
    }
    Ok(Args {
        listen,
        backends,
        threads,
    })
}

async fn run(args: Args) -> Result<(), String> {
    let proxy = Proxy::with_workers(args.threads);
    proxy
        .configure_route("bench", RouteConfig::new(args.listen, Protocol::Http))
        .await
        .map_err(|e| e.to_string())?;
    let backends = args
        .backends
        .iter()
        .enumerate()
        .map(|(i, addr)| Backend::new(format!("b{i}"), *addr, 1))
        .collect();
    proxy
        .set_backends("bench", backends)
        .map_err(|e| e.to_string())?;
    eprintln!(
        "proxy_bench: listening on {} in front of {:?}",
        proxy.local_addr("bench").unwrap_or(args.listen),
        args.backends
    );
    std::future::pending::<()>().await;
    Ok(())
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("proxy_bench: runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("proxy_bench: {e}");
            ExitCode::FAILURE
        }
    }
}
