//! `send --control PATH`: the migration's controls on a Unix socket, one JSON object per line each way, as QMP does;
//! and `livemig ctl`, its client.
//!
//! Commands: `{"cmd":"status"}`, `{"cmd":"cancel"}`, `{"cmd":"switchover"}`, `{"cmd":"postcopy"}`,
//! `{"cmd":"set","max_bandwidth":"200mbit"}` (or `null` to lift the cap), `{"cmd":"set","downtime_target_ms":100}`,
//! `{"cmd":"set","max_throttle_pct":50}`.
//! Each answer is `{"ok":true, ...}` (the status's fields, for `status`) or `{"ok":false,"error":"why"}`. The socket
//! is created mode 0600: whoever may use it may cancel the migration.

use livemig_transport::source::{Change, Controls};
use livemig_transport::stream::{Address, Listen, Stream};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// The longest command line read; a longer one is refused and the connection closed.
const MAX_LINE: usize = 64 << 10;

/// A rate as `--max-bandwidth` and `set max_bandwidth` take it: bits per second as tc writes them (`400mbit`,
/// `1gbit`) or bytes per second (`50MiB/s`, `50MB/s`). Returns bytes per second.
pub fn parse_bandwidth(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("{s:?}: not a rate (400mbit, 1gbit, 50MiB/s)"))?;
    let bytes_per_s = match unit.to_ascii_lowercase().as_str() {
        "bit" => n / 8.0,
        "kbit" => n * 1e3 / 8.0,
        "mbit" => n * 1e6 / 8.0,
        "gbit" => n * 1e9 / 8.0,
        "b/s" => n,
        "kb/s" => n * 1e3,
        "mb/s" => n * 1e6,
        "gb/s" => n * 1e9,
        "kib/s" => n * 1024.0,
        "mib/s" => n * 1024.0 * 1024.0,
        "gib/s" => n * 1024.0 * 1024.0 * 1024.0,
        _ => return Err(format!("{s:?}: unknown unit (bit, kbit, mbit, gbit, or B/s, MB/s, MiB/s, GiB/s)")),
    };
    if bytes_per_s.is_nan() || bytes_per_s < 1.0 {
        return Err(format!("{s:?}: a cap must be at least 8 bit/s"));
    }
    Ok(crate::engine::num::u64_saturating(bytes_per_s))
}

/// Binds `path` as `receive --listen unix:PATH` does (mode 0600; a stale socket replaced, a live one refused) and
/// serves `controls` on it from a thread of its own.
pub fn serve(path: &Path, controls: Arc<Controls>) -> std::io::Result<()> {
    let listener = Address::Unix(path.to_path_buf()).bind()?;
    std::thread::Builder::new().name("lm-control-socket".into()).spawn(move || loop {
        // A failed accept (the peer gone already) only loses that connection.
        if let Ok((conn, _)) = listener.accept_stream() {
            let c = controls.clone();
            let _ = std::thread::Builder::new().name("lm-control-client".into()).spawn(move || client(conn, &c));
        }
    })?;
    Ok(())
}

fn client(conn: Stream, controls: &Controls) {
    let _ = conn.set_write_timeout(Some(Duration::from_secs(5)));
    let Ok(mut out) = conn.try_clone() else { return };
    let mut reader = BufReader::new(&conn);
    let mut line = String::new();
    loop {
        line.clear();
        match std::io::Read::take(&mut reader, MAX_LINE as u64 + 1).read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(n) if n > MAX_LINE => {
                let _ = writeln!(out, "{}", json!({"ok": false, "error": "command longer than 64 KiB"}));
                return;
            }
            Ok(_) => {}
        }
        let answer = answer(line.trim(), controls);
        if writeln!(out, "{answer}").is_err() {
            return;
        }
    }
}

fn refuse(why: impl Into<String>) -> Value {
    json!({"ok": false, "error": why.into()})
}

/// The answer to one command line.
pub fn answer(line: &str, controls: &Controls) -> Value {
    let req: Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => return refuse(format!("not a JSON object: {e}")),
    };
    match req.get("cmd").and_then(Value::as_str) {
        Some("status") => {
            let s = controls.status();
            json!({
                "ok": true, "phase": s.phase, "round": s.round, "remaining_pages": s.remaining_pages,
                "dirty_rate_pps": s.dirty_rate_pps, "throughput_bps": s.throughput_bps * 8.0,
                "predicted_downtime_ms": s.predicted_downtime_ms, "throttle_pct": s.throttle_pct, "eta_s": s.eta_s,
                "bytes_on_wire": s.bytes_on_wire, "downtime_target_ms": s.downtime_target_ms,
                "max_bandwidth_bps": s.max_bandwidth.map(|b| b * 8), "max_throttle_pct": s.max_throttle_pct,
                "link_throughput_bps": s.link_throughput_bps.iter().map(|b| b * 8.0).collect::<Vec<_>>(),
            })
        }
        Some("cancel") => {
            controls.cancel("cancelled through the control socket");
            json!({"ok": true})
        }
        Some("switchover") => match controls.push(Change::SwitchoverNow) {
            Ok(()) => json!({"ok": true}),
            Err(e) => refuse(e.to_string()),
        },
        Some("postcopy") => match controls.push(Change::PostcopyNow) {
            Ok(()) => json!({"ok": true}),
            Err(e) => refuse(e.to_string()),
        },
        Some("set") => set(&req, controls),
        Some(other) => refuse(format!("unknown command {other:?} (status, cancel, switchover, postcopy, set)")),
        None => refuse("no \"cmd\""),
    }
}

/// What `set` takes.
const SETTABLE: &str = "max_bandwidth, downtime_target_ms, max_throttle_pct";

fn set(req: &Value, controls: &Controls) -> Value {
    let mut changes = Vec::new();
    for (key, v) in req.as_object().into_iter().flatten().filter(|(k, _)| *k != "cmd") {
        let change = match (key.as_str(), v) {
            ("max_bandwidth", Value::Null) => Change::MaxBandwidth(None),
            ("max_bandwidth", Value::String(s)) => match parse_bandwidth(s) {
                Ok(b) => Change::MaxBandwidth(Some(b)),
                Err(e) => return refuse(e),
            },
            ("downtime_target_ms", v) => match v.as_f64().filter(|ms| ms.is_finite() && *ms >= 0.0) {
                Some(ms) => Change::DowntimeTarget(Duration::from_secs_f64(ms / 1e3)),
                None => return refuse("downtime_target_ms: a number of milliseconds, above 0 and at most 60000"),
            },
            ("max_throttle_pct", v) => match v.as_f64() {
                Some(pct) => Change::MaxThrottle(pct),
                None => return refuse("max_throttle_pct: a number of percent, 0 to 99"),
            },
            (k, _) => return refuse(format!("cannot set {k:?} ({SETTABLE})")),
        };
        if let Err(e) = change.check() {
            return refuse(format!("{key}: {e}"));
        }
        changes.push(change);
    }
    if changes.is_empty() {
        return refuse(format!("set what? ({SETTABLE})"));
    }
    // All checked above: none is refused here, so a command changes all it names or nothing.
    for c in changes {
        let _ = controls.push(c);
    }
    json!({"ok": true})
}

/// Sends one command to the control socket at `path` and returns its answer.
pub fn request(path: &Path, cmd: &Value) -> std::io::Result<Value> {
    let mut conn = UnixStream::connect(path)?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    writeln!(conn, "{cmd}")?;
    let mut line = String::new();
    BufReader::new(&conn).read_line(&mut line)?;
    serde_json::from_str(&line).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_in_bits_or_bytes() {
        assert_eq!(parse_bandwidth("400mbit"), Ok(50_000_000));
        assert_eq!(parse_bandwidth("1gbit"), Ok(125_000_000));
        assert_eq!(parse_bandwidth("50MiB/s"), Ok(50 << 20));
        assert_eq!(parse_bandwidth("50MB/s"), Ok(50_000_000));
        assert!(
            parse_bandwidth("fast").is_err()
                && parse_bandwidth("0mbit").is_err()
                && parse_bandwidth("5 furlongs").is_err()
        );
    }

    #[test]
    fn commands_become_changes_and_bad_ones_say_why() {
        let c = Controls::default();
        assert_eq!(answer(r#"{"cmd":"set","max_bandwidth":"200mbit"}"#, &c), json!({"ok": true}));
        assert_eq!(answer(r#"{"cmd":"set","downtime_target_ms":100}"#, &c), json!({"ok": true}));
        assert_eq!(answer(r#"{"cmd":"set","max_throttle_pct":40}"#, &c), json!({"ok": true}));
        assert_eq!(answer(r#"{"cmd":"switchover"}"#, &c), json!({"ok": true}));
        assert_eq!(answer(r#"{"cmd":"postcopy"}"#, &c), json!({"ok": true}));
        assert_eq!(answer(r#"{"cmd":"cancel"}"#, &c), json!({"ok": true}));
        let taken = c.take_for_test();
        assert_eq!(
            taken,
            [
                Change::MaxBandwidth(Some(25_000_000)),
                Change::DowntimeTarget(Duration::from_millis(100)),
                Change::MaxThrottle(40.0),
                Change::SwitchoverNow,
                Change::PostcopyNow,
                Change::Cancel("cancelled through the control socket".into())
            ]
        );
        for (bad, why) in [
            ("nonsense", "not a JSON object"),
            (r#"{"cmd":"reboot"}"#, "unknown command"),
            (r#"{"cmd":"set","max_bandwidth":"lots"}"#, "not a rate"),
            (r#"{"cmd":"set","downtime_target_ms":-5}"#, "above 0"),
            (r#"{"cmd":"set","downtime_target_ms":0}"#, "above 0"),
            (r#"{"cmd":"set","downtime_target_ms":90000}"#, "at most 60000"),
            (r#"{"cmd":"set","max_throttle_pct":120}"#, "0 to 99"),
            // Nothing of a command with one bad value is taken.
            (r#"{"cmd":"set","max_bandwidth":"100mbit","max_throttle_pct":-1}"#, "max_throttle_pct: throttle"),
            (r#"{"cmd":"set","workers":4}"#, "cannot set"),
            (r#"{"cmd":"set"}"#, "set what"),
        ] {
            let a = answer(bad, &c);
            assert_eq!(a["ok"], false, "{bad}");
            assert!(a["error"].as_str().unwrap().contains(why), "{bad}: {a}");
        }
        assert!(c.take_for_test().is_empty(), "a refused command changed something");
    }
}
