//! The two-host lab on one machine: two network namespaces joined by shaped veth pairs.
//!
//! `PREFIX-src` and `PREFIX-dst` (default prefix `lm`) are joined by `vmnic1..N`. Link k is 198.18.k.1/30 on the source
//! side and 198.18.k.2/30 on the destination side (the benchmark range, RFC 2544), shaped by a tbf qdisc on the
//! source side at its rate. `livemig lab run` ([`Lab::commands`]) starts `livemig receive` in the destination
//! namespace and `livemig send` in the source namespace, as two processes, one `--link` per NIC, each bound to its
//! vmnic.
//!
//! Everything is done with `ip` and `tc`, as an operator would. [`LabGuard`] tears a lab down when dropped, so a test
//! that fails still leaves no namespace behind.

use std::path::Path;
use std::process::{Command, Output, Stdio};

/// A lab problem, naming the command that failed.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// A command could not be started.
    #[error("running `{cmd}`: {source}")]
    Spawn {
        /// The command line.
        cmd: String,
        /// Why.
        source: std::io::Error,
    },
    /// A command exited non-zero.
    #[error("`{cmd}` failed: {stderr}")]
    Command {
        /// The command line.
        cmd: String,
        /// What it printed.
        stderr: String,
    },
    /// A rate is not one tc understands.
    #[error("rate '{0}' is not a rate like 1gbit, 500mbit or 100mbit")]
    BadRate(String),
    /// The lab has no links (not up, or another prefix).
    #[error("no lab with prefix '{0}' is up (run `livemig lab up` first)")]
    NotUp(String),
    /// Bad arguments.
    #[error("{0}")]
    Usage(String),
}

/// A rate for tc: a number and a unit (bit, kbit, mbit, gbit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rate {
    /// As tc takes it.
    pub text: String,
    /// Bits per second.
    pub bps: u64,
}

impl std::str::FromStr for Rate {
    type Err = LabError;

    fn from_str(s: &str) -> Result<Rate, LabError> {
        let t = s.trim().to_ascii_lowercase();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num.parse().map_err(|_| LabError::BadRate(s.into()))?;
        let mult = match unit {
            "bit" => 1,
            "kbit" => 1_000,
            "mbit" => 1_000_000,
            "gbit" => 1_000_000_000,
            _ => return Err(LabError::BadRate(s.into())),
        };
        if n == 0 {
            return Err(LabError::BadRate(s.into()));
        }
        Ok(Rate { text: t.clone(), bps: n * mult })
    }
}

/// Parses `RATE` or `RATE,RATE,...` for `n` links: one rate for all, or exactly one per link.
pub fn parse_rates(s: &str, n: usize) -> Result<Vec<Rate>, LabError> {
    let rates = s.split(',').map(str::parse).collect::<Result<Vec<Rate>, _>>()?;
    match rates.len() {
        1 => Ok(vec![rates[0].clone(); n]),
        k if k == n => Ok(rates),
        k => Err(LabError::Usage(format!("{k} rates for {n} links: give one rate, or one per link"))),
    }
}

fn run(cmd: &mut Command) -> Result<Output, LabError> {
    let line = format!("{cmd:?}").replace('"', "");
    let out = cmd.output().map_err(|source| LabError::Spawn { cmd: line.clone(), source })?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(LabError::Command { cmd: line, stderr: String::from_utf8_lossy(&out.stderr).trim().to_string() })
    }
}

fn ip(args: &[&str]) -> Result<Output, LabError> {
    run(Command::new("ip").args(args))
}

/// A lab's namespaces.
#[derive(Debug, Clone)]
pub struct Lab {
    /// Namespace prefix.
    pub prefix: String,
}

/// The control and data port of `livemig receive` in the lab.
pub const PORT: u16 = 7000;

impl Lab {
    /// The lab with namespaces `PREFIX-src` and `PREFIX-dst`.
    pub fn new(prefix: &str) -> Lab {
        Lab { prefix: prefix.to_string() }
    }

    /// The source namespace.
    pub fn src(&self) -> String {
        format!("{}-src", self.prefix)
    }

    /// The destination namespace.
    pub fn dst(&self) -> String {
        format!("{}-dst", self.prefix)
    }

    /// Creates the namespaces and `rates.len()` shaped links. On any failure, removes what it made.
    pub fn up(&self, rates: &[Rate]) -> Result<(), LabError> {
        if rates.is_empty() || rates.len() > 250 {
            return Err(LabError::Usage(format!("{} links: a lab has 1 to 250", rates.len())));
        }
        let made = self.build(rates);
        if made.is_err() {
            self.down();
        }
        made
    }

    fn build(&self, rates: &[Rate]) -> Result<(), LabError> {
        let (src, dst) = (self.src(), self.dst());
        ip(&["netns", "add", &src])?;
        ip(&["netns", "add", &dst])?;
        for ns in [&src, &dst] {
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        for (i, rate) in rates.iter().enumerate() {
            let k = i + 1;
            let nic = format!("vmnic{k}");
            ip(&["link", "add", &nic, "netns", &src, "type", "veth", "peer", "name", &nic, "netns", &dst])?;
            ip(&["-n", &src, "addr", "add", &format!("198.18.{k}.1/30"), "dev", &nic])?;
            ip(&["-n", &dst, "addr", "add", &format!("198.18.{k}.2/30"), "dev", &nic])?;
            ip(&["-n", &src, "link", "set", &nic, "up"])?;
            ip(&["-n", &dst, "link", "set", &nic, "up"])?;
            // The bucket must hold a whole GSO segment (64 KiB on veth) and about 4 ms at the rate, or tbf holds
            // back more than the rate says at high rates.
            let burst = (rate.bps / 8 / 250).max(256 << 10);
            run(Command::new("tc")
                .args(["-n", &src, "qdisc", "add", "dev", &nic, "root", "tbf", "rate", &rate.text])
                .args(["burst", &burst.to_string(), "latency", "50ms"]))?;
        }
        Ok(())
    }

    /// Removes both namespaces (and with them every vmnic). Missing ones are fine.
    pub fn down(&self) {
        for ns in [self.src(), self.dst()] {
            let _ = Command::new("ip").args(["netns", "del", &ns]).stderr(Stdio::null()).status();
        }
    }

    /// The lab's links, `vmnic1..N`, as found in the source namespace.
    pub fn links(&self) -> Result<usize, LabError> {
        let out = ip(&["-n", &self.src(), "-o", "link", "show"]).map_err(|_| LabError::NotUp(self.prefix.clone()))?;
        let n = String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.contains(": vmnic")).count();
        if n == 0 {
            return Err(LabError::NotUp(self.prefix.clone()));
        }
        Ok(n)
    }

    /// Takes link `k` (1-based) down or up on the source side, as a pulled cable would look.
    pub fn set_link(&self, k: usize, up: bool) -> Result<(), LabError> {
        ip(&["-n", &self.src(), "link", "set", &format!("vmnic{k}"), if up { "up" } else { "down" }]).map(drop)
    }

    /// Bytes sent on link `k` from the source side.
    pub fn tx_bytes(&self, k: usize) -> Result<u64, LabError> {
        let out = ip(&["-n", &self.src(), "-s", "-o", "link", "show", &format!("vmnic{k}")])?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        // `-o -s` prints "... TX: bytes packets ...\    <bytes> <packets> ..." on one line.
        let tx = text.split("TX:").nth(1).and_then(|t| t.split('\\').nth(1)).and_then(|t| t.split_whitespace().next());
        tx.and_then(|v| v.parse().ok()).ok_or_else(|| LabError::Command { cmd: "ip -s link show".into(), stderr: text })
    }

    /// The commands `lab run` starts: `receive` in the destination namespace (preallocating `prealloc` bytes of guest
    /// memory, if given) and `send` in the source namespace with one `--link` per vmnic and `send_args` after them;
    /// `security` holds each side's TLS arguments ([`crate::bench::security_args`]).
    pub fn commands(
        &self,
        exe: &Path,
        send_args: &[String],
        prealloc: Option<u64>,
        reports: (&Path, &Path),
        security: &(Vec<String>, Vec<String>),
    ) -> Result<(Command, Command), LabError> {
        let n = self.links()?;
        let to = format!("198.18.1.2:{PORT}");
        let mut recv = Command::new("ip");
        recv.args(["netns", "exec", &self.dst()]).arg(exe).args(["receive", "--listen", &format!("0.0.0.0:{PORT}")]);
        recv.arg("--report").arg(reports.0).args(&security.0);
        if let Some(bytes) = prealloc {
            recv.args(["--prealloc", &bytes.to_string()]);
        }
        if send_args.windows(2).any(|w| w[0] == "--send-path" && w[1] == "uring")
            || send_args.iter().any(|a| a == "--send-path=uring")
        {
            // One ring per side.
            recv.args(["--recv-path", "uring"]);
        }
        let mut send = Command::new("ip");
        send.args(["netns", "exec", &self.src()]).arg(exe).args(["send", "--to", &to]);
        for k in 1..=n {
            send.args(["--link", &format!("vmnic{k}=198.18.{k}.1>198.18.{k}.2:{PORT}")]);
        }
        send.args(send_args).args(&security.1).arg("--report").arg(reports.1);
        Ok((recv, send))
    }
}

/// Tears a lab down when dropped: for tests, so that a failing test leaves nothing behind.
pub struct LabGuard(pub Lab);

impl Drop for LabGuard {
    fn drop(&mut self) {
        self.0.down();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse() {
        assert_eq!("1gbit".parse::<Rate>().unwrap().bps, 1_000_000_000);
        assert_eq!(parse_rates("1gbit,1gbit,500mbit,100mbit", 4).unwrap()[3].bps, 100_000_000);
        assert_eq!(parse_rates("1gbit", 3).unwrap().len(), 3);
        assert!(parse_rates("1gbit,2gbit", 3).is_err());
        assert!("fast".parse::<Rate>().is_err());
        assert!("0mbit".parse::<Rate>().is_err());
        assert!("10gb".parse::<Rate>().is_err());
    }
}
