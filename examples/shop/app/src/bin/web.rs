//! The shop's web service: a small HTTP/1.1 server (std, keep-alive) in
//! front of PostgreSQL.
//!
//! - `GET /healthz`: `ok` while the process serves (not the database: a
//!   database replacement must not make kiln replace the web instances).
//! - `GET /`: the greeting of the config file (`--config`) and the instance.
//! - `POST /orders?key=K&item=I`: records an order once per `key` (a retried
//!   request returns the same id) and answers `id` once it is committed.
//! - `GET /orders/K`: the order with key K, or 404.
//! - `GET /orders`: `total processed`, counted in the database.
//! - `GET /ready`: whether the database answers now (no retry).
//! - `GET /db/show?name=N`: the database's setting N (`SHOW N`), to see
//!   which configuration the running database has.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use shop::{Client, Db};

struct App {
    db: Db,
    pool: Mutex<Vec<Client>>,
    greeting: String,
}

impl App {
    /// Runs `work` with a pooled connection, retrying through database
    /// replacements (see [`Db::retry`]).
    fn with_db<T>(
        &self,
        work: impl FnMut(&mut Client) -> Result<T, shop::Error>,
    ) -> Result<T, shop::Error> {
        let mut conn = self.pool.lock().expect("pool").pop();
        let out = self.db.retry(&mut conn, work);
        if let Some(c) = conn.filter(|c| !c.is_closed()) {
            self.pool.lock().expect("pool").push(c);
        }
        out
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut port = std::env::var("PORT").unwrap_or_else(|_| "8080".into());
    let mut config = String::from("/etc/shop/web.toml");
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--port" => port = args.next().expect("--port needs a value"),
            "--config" => config = args.next().expect("--config needs a value"),
            other => {
                eprintln!(
                    "shop-web: unknown argument {other}\nusage: shop-web [--port N] [--config FILE]"
                );
                std::process::exit(2);
            }
        }
    }
    let greeting = std::fs::read_to_string(&config)
        .ok()
        .and_then(|text| {
            text.lines().find_map(|l| {
                l.strip_prefix("greeting = ")
                    .map(|v| v.trim_matches('"').to_owned())
            })
        })
        .unwrap_or_else(|| "welcome to the shop".to_owned());
    let instance = std::env::var("KILN_INSTANCE").unwrap_or_else(|_| "local".into());
    let app = Arc::new(App {
        db: Db::from_env(),
        pool: Mutex::new(Vec::new()),
        greeting: format!("{greeting} from {instance}\n"),
    });
    let listener = TcpListener::bind(("0.0.0.0", port.parse::<u16>().expect("port is a number")))
        .unwrap_or_else(|e| panic!("cannot listen on port {port}: {e}"));
    {
        let app = app.clone();
        std::thread::spawn(move || {
            if let Err(e) = app.with_db(|c| c.batch_execute(shop::SCHEMA)) {
                eprintln!("shop-web: cannot create the schema: {e}");
            }
        });
    }
    eprintln!("shop-web: {instance} listening on port {port}");
    for stream in listener.incoming().flatten() {
        let app = app.clone();
        std::thread::spawn(move || serve(stream, &app));
    }
}

fn serve(stream: TcpStream, app: &App) {
    let _ = stream.set_nodelay(true);
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let mut close = false;
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let lower = line.to_ascii_lowercase();
            if lower == "connection: close" {
                close = true;
            } else if let Some(v) = lower.strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            }
        }
        if length > 1 << 20 {
            return;
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let mut parts = request_line.split_whitespace();
        let method = parts.next().unwrap_or("GET");
        let target = parts.next().unwrap_or("/");
        let (status, body) = answer(app, method, target);
        let response = format!(
            "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n{}\r\n{body}",
            body.len(),
            if close { "connection: close\r\n" } else { "" }
        );
        if out.write_all(response.as_bytes()).is_err() || close {
            return;
        }
    }
}

fn answer(app: &App, method: &str, target: &str) -> (&'static str, String) {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let param = |name: &str| {
        query
            .split('&')
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
            .map(str::to_owned)
    };
    let failed = |e: shop::Error| ("503 Service Unavailable", format!("database: {e}\n"));
    match (method, path) {
        ("GET", "/healthz") => ("200 OK", "ok\n".into()),
        ("GET", "/") => ("200 OK", app.greeting.clone()),
        ("GET", "/ready") => match app
            .db
            .connect()
            .and_then(|mut c| c.simple_query("SELECT 1"))
        {
            Ok(_) => ("200 OK", "ready\n".into()),
            Err(e) => failed(e),
        },
        ("POST", "/orders") => {
            let (Some(key), Some(item)) = (param("key"), param("item")) else {
                return ("400 Bad Request", "POST /orders?key=K&item=I\n".into());
            };
            let id = app.with_db(|c| {
                let row = c.query_one(
                    "INSERT INTO orders (key, item) VALUES ($1, $2)
                     ON CONFLICT (key) DO UPDATE SET key = EXCLUDED.key
                     RETURNING id",
                    &[&key, &item],
                )?;
                Ok(row.get::<_, i64>(0))
            });
            match id {
                Ok(id) => ("200 OK", format!("{id}\n")),
                Err(e) => failed(e),
            }
        }
        ("GET", "/orders") => {
            let counts = app.with_db(|c| {
                let row = c.query_one("SELECT count(*), count(processed_at) FROM orders", &[])?;
                Ok((row.get::<_, i64>(0), row.get::<_, i64>(1)))
            });
            match counts {
                Ok((total, processed)) => ("200 OK", format!("{total} {processed}\n")),
                Err(e) => failed(e),
            }
        }
        ("GET", "/db/show") => {
            let Some(name) = param("name").filter(|n| {
                !n.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            }) else {
                return ("400 Bad Request", "GET /db/show?name=SETTING\n".into());
            };
            let value = app.with_db(|c| {
                let row = c.query_one("SELECT current_setting($1)", &[&name])?;
                Ok(row.get::<_, String>(0))
            });
            match value {
                Ok(v) => ("200 OK", format!("{v}\n")),
                Err(e) => failed(e),
            }
        }
        ("GET", p) if p.starts_with("/orders/") => {
            let key = p["/orders/".len()..].to_owned();
            let found = app.with_db(|c| {
                c.query_opt("SELECT id, item FROM orders WHERE key = $1", &[&key])
                    .map(|r| r.map(|r| (r.get::<_, i64>(0), r.get::<_, String>(1))))
            });
            match found {
                Ok(Some((id, item))) => ("200 OK", format!("{id} {item}\n")),
                Ok(None) => ("404 Not Found", "no such order\n".into()),
                Err(e) => failed(e),
            }
        }
        _ => ("404 Not Found", "not found\n".into()),
    }
}
