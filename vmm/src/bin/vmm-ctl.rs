//! `vmm-ctl`: a small client for the VMM's control API (docs/api.md).
//!
//! `vmm-ctl --socket PATH CMD [JSON-ARGS]` sends one request and prints the
//! reply line; the exit status is 0 for an `ok` reply and 1 for an `error`
//! reply or any failure. `--events` prints event lines as they come (after
//! the reply, until the VMM closes the socket); without CMD it only follows
//! events. With neither, it prints the greeting.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use serde_json::{json, Value};

#[derive(Debug, Parser)]
#[command(version, about = "Send a command to the VMM's control API socket")]
struct Cli {
    /// The VMM's --api-socket path.
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,

    /// Print events (one JSON line each) until the VMM closes the socket.
    #[arg(long)]
    events: bool,

    /// Seconds to wait for the reply.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    timeout: u64,

    /// Command, e.g. vm.info, vm.shutdown, usb.attach, usb.detach, usb.list.
    cmd: Option<String>,

    /// Arguments as a JSON object, e.g. '{"path":"/disk.img","port":5}'.
    args: Option<String>,
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("vmm-ctl: {msg}");
    ExitCode::from(1)
}

fn read_json(r: &mut impl BufRead) -> Result<Option<Value>, String> {
    let mut line = String::new();
    match r.read_line(&mut line) {
        Ok(0) => Ok(None),
        Ok(_) => serde_json::from_str(&line)
            .map(Some)
            .map_err(|e| format!("bad line from the VMM: {e}")),
        Err(e) => Err(format!("reading from the VMM: {e}")),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let args: Value = match &cli.args {
        None => json!({}),
        Some(text) => match serde_json::from_str(text) {
            Ok(v @ Value::Object(_)) => v,
            Ok(_) => return fail("JSON-ARGS must be a JSON object"),
            Err(e) => return fail(format!("JSON-ARGS: {e}")),
        },
    };
    let stream = match UnixStream::connect(&cli.socket) {
        Ok(s) => s,
        Err(e) => return fail(format!("{}: {e}", cli.socket.display())),
    };
    let timeout = Some(Duration::from_secs(cli.timeout.max(1)));
    if let Err(e) = stream.set_read_timeout(timeout) {
        return fail(e);
    }
    let mut reader = match stream.try_clone() {
        Ok(s) => BufReader::new(s),
        Err(e) => return fail(e),
    };
    let greeting = match read_json(&mut reader) {
        Ok(Some(g)) => g,
        Ok(None) => return fail("the VMM closed the connection"),
        Err(e) => return fail(e),
    };
    if greeting.get("hello").is_none() {
        // An error line instead of the greeting, e.g. too many connections.
        println!("{greeting}");
        return ExitCode::from(1);
    }
    let mut status = ExitCode::SUCCESS;
    let mut stdout = std::io::stdout();
    if let Some(cmd) = &cli.cmd {
        let request = json!({"id": 1, "cmd": cmd, "args": args});
        let mut w = &stream;
        if let Err(e) = writeln!(w, "{request}") {
            return fail(format!("sending the request: {e}"));
        }
        loop {
            match read_json(&mut reader) {
                Ok(Some(v)) if v.get("event").is_some() => {
                    if cli.events {
                        let _ = writeln!(stdout, "{v}");
                    }
                }
                Ok(Some(v)) => {
                    let _ = writeln!(stdout, "{v}");
                    if v.get("ok").is_none() {
                        status = ExitCode::from(1);
                    }
                    if v.get("id") == Some(&json!(1)) || v.get("id") == Some(&Value::Null) {
                        break;
                    }
                }
                Ok(None) => return fail("the VMM closed the connection before replying"),
                Err(e) => return fail(e),
            }
        }
    } else if !cli.events {
        let _ = writeln!(stdout, "{greeting}");
    }
    if cli.events {
        let _ = stdout.flush();
        if let Err(e) = stream.set_read_timeout(None) {
            return fail(e);
        }
        loop {
            match read_json(&mut reader) {
                Ok(Some(v)) => {
                    let _ = writeln!(stdout, "{v}");
                    let _ = stdout.flush();
                }
                Ok(None) => break,
                Err(e) => return fail(e),
            }
        }
    }
    status
}
