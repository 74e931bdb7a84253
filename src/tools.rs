//! The CLI's tools around a migration: `lab` (two network-namespace hosts on this machine) and `bench` (the
//! benchmark matrix), each running `receive` and `send` as processes of their own.

use crate::args::{BenchArgs, LabCmd};
use crate::usage;
use anyhow::{anyhow, bail, Context, Result};
use livemig::bench::{self, BenchConfig, Hosts, Scenario};
use livemig::lab::{parse_rates, Lab};
use livemig::report::parse_size;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

pub(crate) fn lab_cmd(cmd: LabCmd) -> Result<()> {
    match cmd {
        LabCmd::Up { links, rate, prefix } => {
            let rates = parse_rates(&rate, links)?;
            Lab::new(&prefix).up(&rates)?;
            let shown: Vec<&str> = rates.iter().map(|r| r.text.as_str()).collect();
            eprintln!("lab {prefix}: {links} link(s) {} between {prefix}-src and {prefix}-dst", shown.join(","));
            Ok(())
        }
        LabCmd::Down { prefix } => {
            Lab::new(&prefix).down();
            Ok(())
        }
        LabCmd::Run { prefix, no_prealloc, send_args } => lab_run(&Lab::new(&prefix), !no_prealloc, send_args),
    }
}

/// `lab run`: both hosts as processes in their namespaces; prints both reports.
fn lab_run(lab: &Lab, prealloc: bool, mut send_args: Vec<String>) -> Result<()> {
    // The source's report goes where the user asked, the rest to a scratch directory.
    let dir = std::env::temp_dir().join(format!("livemig-lab-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut source_report = dir.join("source.json");
    if let Some(i) = send_args.iter().position(|a| a == "--report") {
        if i + 1 >= send_args.len() {
            return Err(usage("--report needs a file"));
        }
        source_report = PathBuf::from(send_args.remove(i + 1));
        send_args.remove(i);
    }
    let dest_report = dir.join("destination.json");
    let exe = std::env::current_exe()?;
    let memory = match send_args.iter().position(|a| a == "--memory") {
        Some(i) => parse_size(send_args.get(i + 1).map_or("", String::as_str)).map_err(|e| anyhow!(e))?,
        None => 2 << 30,
    };
    // Only a synthetic destination can be preallocated before the Hello says what it will host.
    let kvm = send_args.windows(2).any(|w| w[0] == "--guest" && w[1] == "kvm");
    let prealloc = (prealloc && !kvm).then_some(memory);
    let insecure = bench::take_insecure(&mut send_args);
    let security = bench::security_args(&dir, insecure)?;
    let _creds = bench::RemoveOnDrop(dir.join("tls"));
    let (mut recv, mut send) = lab.commands(&exe, &send_args, prealloc, (&dest_report, &source_report), &security)?;
    let prefix = lab.dst();
    let receiver = bench::spawn_ready(&mut recv, "waiting for a migration", move |l| eprintln!("[{prefix}] {l}"))
        .with_context(|| format!("starting receive in {}", lab.dst()))?;
    let sent = send.stderr(Stdio::inherit()).output().context("running send")?;
    // A receiver whose source failed ends on its own once the connection drops; give it ten seconds.
    let (received, received_ok) = receiver.finish(Duration::from_secs(10))?;
    println!("== source: send in {} ==", lab.src());
    print!("{}", String::from_utf8_lossy(&sent.stdout));
    println!("== destination: receive in {} ==", lab.dst());
    print!("{received}");
    if let Ok(text) = std::fs::read_to_string(&source_report) {
        if let Ok(r) = serde_json::from_str::<serde_json::Value>(&text) {
            if let Some(g) = round0_goodput(&r) {
                println!("round 0 aggregate goodput {:.2} Gbit/s", g / 1e9);
            }
        }
    }
    println!("reports: {} and {}", source_report.display(), dest_report.display());
    if !sent.status.success() {
        bail!("send failed in {} ({})", lab.src(), sent.status);
    }
    if !received_ok {
        bail!("receive failed in {}", lab.dst());
    }
    Ok(())
}

/// Round 0's wire bits per second, from a report.
fn round0_goodput(r: &serde_json::Value) -> Option<f64> {
    let r0 = r.get("rounds")?.get(0)?;
    let bytes = r0.get("bytes_on_wire")?.as_f64()?;
    let secs = r0.get("duration_s")?.as_f64()?;
    (secs > 0.0).then(|| bytes * 8.0 / secs)
}

/// The benchmark matrix from `bench`'s arguments, each list checked.
fn bench_config(a: &BenchArgs) -> Result<BenchConfig> {
    let list = |s: &str| s.split(',').map(str::trim).filter(|x| !x.is_empty()).map(String::from).collect::<Vec<_>>();
    let one_of = |flag: &str, items: Vec<String>, allowed: &[&str]| match items
        .iter()
        .find(|x| !allowed.contains(&x.as_str()))
    {
        Some(x) => Err(usage(format!("{flag}: unknown value '{x}' ({})", allowed.join(", ")))),
        None => Ok(items),
    };
    let scenarios = list(&a.scenarios).iter().map(|s| Scenario::parse(s)).collect::<Result<Vec<_>, _>>()?;
    let links = list(&a.links)
        .iter()
        .map(|n| {
            n.parse::<usize>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| usage(format!("--links: '{n}' is not a link count")))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(BenchConfig {
        scenarios,
        links,
        paths: one_of("--paths", list(&a.paths), &["copy", "vectored", "zerocopy", "uring", "auto"])?,
        memory: a.memory,
        hosts: a.lab.then(|| Lab::new(&a.prefix)).map_or(Hosts::Loopback, Hosts::Lab),
        exe: std::env::current_exe()?,
        dir: std::env::temp_dir().join(format!("livemig-bench-{}", std::process::id())),
        send_args: if a.no_compress { vec!["--no-compress".to_string()] } else { Vec::new() },
        security: one_of("--security", list(&a.security), &["mtls", "insecure"])?,
        repeat: usize::from(a.repeat),
    })
}

pub(crate) fn bench_cmd(a: &BenchArgs) -> Result<()> {
    let (memory, output, plot) = (a.memory, &a.output, a.plot.as_deref());
    let cfg = bench_config(a)?;
    let where_ = match &cfg.hosts {
        Hosts::Loopback => "loopback".to_string(),
        Hosts::Lab(l) => format!("lab {} ({} link(s))", l.prefix, l.links()?),
    };
    let n_rows = cfg.scenarios.len() * cfg.links.len() * cfg.paths.len() * cfg.security.len();
    eprintln!("bench over {where_}: {n_rows} row(s)");
    let mut done = |r: &bench::Row| {
        let runs: Vec<String> =
            r.runs.iter().map(|x| format!("{:.2}/{:.2}", x.wire_bps / 1e9, x.baseline_bps / 1e9)).collect();
        eprintln!(
            "{} {} link(s) {} {}: {:.3} s, {:.2} Gbit/s, baseline {:.2} Gbit/s (medians; runs, ours/baseline: {})",
            r.scenario.name(),
            r.links,
            r.send_path,
            r.security,
            r.total_time_s,
            r.wire_bps / 1e9,
            r.baseline_bps / 1e9,
            runs.join(" ")
        )
    };
    let rows = bench::run(&cfg, &mut done)?;
    print!("{}", bench::table(&rows));
    let json = serde_json::json!({
        "hosts": where_, "memory_bytes": memory, "send_args": cfg.send_args, "repeat": cfg.repeat, "rows": rows
    });
    std::fs::write(output, serde_json::to_string_pretty(&json)?)
        .with_context(|| format!("writing {}", output.display()))?;
    println!("rows: {}", output.display());
    if let Some(plot) = plot {
        for r in &rows {
            let file = plot.with_file_name(format!(
                "{}-{}-{}l-{}-{}.svg",
                plot.file_stem().unwrap_or_default().to_string_lossy(),
                r.scenario.name(),
                r.links,
                r.send_path,
                r.security
            ));
            let report = bench::read_report(&r.source_report)?;
            livemig::plot::draw(&livemig::plot::PlotData::from_report(&report), &file)?;
            println!("plot: {}", file.display());
        }
    }
    if rows.iter().any(|r| !r.verified) {
        bail!("a row's migration did not complete verified");
    }
    Ok(())
}
