//! A tiny HTTP/1.1 server (std only) for kiln's example: `GET /` answers with
//! the greeting from its config file and the instance's name, `GET /healthz`
//! answers `ok`, `GET /slow?ms=N` answers after N milliseconds (to exercise
//! draining), `GET /starts` answers how many instances ever started, counted
//! in the data volume (`--data DIR`, where each start appends a line to
//! `starts.log`): the volume outlives every replacement. Keep-alive is supported so load generators measure the proxy,
//! not connection setup.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

fn main() {
    let mut args = std::env::args().skip(1);
    let mut port = std::env::var("PORT").unwrap_or_else(|_| "8080".into());
    let mut config = String::from("/etc/hello/config.toml");
    let mut data: Option<String> = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--port" => port = args.next().expect("--port needs a value"),
            "--config" => config = args.next().expect("--config needs a value"),
            "--data" => data = Some(args.next().expect("--data needs a value")),
            other => {
                eprintln!(
                    "hello: unknown argument {other}\nusage: hello [--port N] [--config FILE] [--data DIR]"
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
        .unwrap_or_else(|| "hello".to_owned());
    let instance = std::env::var("KILN_INSTANCE").unwrap_or_else(|_| "local".into());
    let listener = TcpListener::bind(("0.0.0.0", port.parse::<u16>().expect("port is a number")))
        .unwrap_or_else(|e| panic!("cannot listen on port {port}: {e}"));
    eprintln!("hello: {instance} listening on port {port}");
    let starts = data.map(|dir| std::path::Path::new(&dir).join("starts.log"));
    if let Some(path) = &starts {
        let line = format!("{instance}\n");
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut f| f.write_all(line.as_bytes()))
            .unwrap_or_else(|e| panic!("cannot append to {}: {e}", path.display()));
    }
    for stream in listener.incoming().flatten() {
        let body = format!("{greeting} from {instance}\n");
        let starts = starts.clone();
        std::thread::spawn(move || serve(stream, &body, starts.as_deref()));
    }
}

fn serve(stream: TcpStream, greeting: &str, starts: Option<&std::path::Path>) {
    let Ok(write_half) = stream.try_clone() else {
        return;
    };
    let mut out = write_half;
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
        if length > 0 {
            let mut body = vec![0; length];
            if std::io::Read::read_exact(&mut reader, &mut body).is_err() {
                return;
            }
        }
        let path = request_line.split_whitespace().nth(1).unwrap_or("/");
        let (status, body) = match path {
            "/healthz" => ("200 OK", "ok\n".to_owned()),
            "/" => ("200 OK", greeting.to_owned()),
            "/starts" => match starts.map(std::fs::read_to_string) {
                Some(Ok(text)) => ("200 OK", format!("{}\n", text.lines().count())),
                Some(Err(e)) => ("500 Internal Server Error", format!("{e}\n")),
                None => ("404 Not Found", "no --data directory\n".to_owned()),
            },
            p if p.starts_with("/slow") => {
                let ms = p
                    .split("ms=")
                    .nth(1)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(1000);
                std::thread::sleep(Duration::from_millis(ms));
                ("200 OK", greeting.to_owned())
            }
            _ => ("404 Not Found", "not found\n".to_owned()),
        };
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
