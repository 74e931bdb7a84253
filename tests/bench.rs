//! `livemig bench` end to end over loopback: a small matrix, its JSON rows and its plots.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_livemig");

#[test]
fn bench_prints_the_matrix_writes_rows_and_draws_each_row() {
    let dir = std::env::temp_dir().join(format!("livemig-benchtest-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (rows, plot) = (dir.join("rows.json"), dir.join("p.svg"));
    let out = Command::new(BIN)
        .args(["bench", "--memory", "64MiB", "--links", "1,2", "--paths", "copy,vectored,uring", "--output"])
        .arg(&rows)
        .arg("--plot")
        .arg(&plot)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("TCP Gb") && stdout.contains("ratio"), "{stdout}");
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&rows).unwrap()).unwrap();
    let rows = json["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 12, "2 link counts × 3 paths × 2 security modes");
    let modes: Vec<&str> = rows.iter().map(|r| r["security"].as_str().unwrap()).collect();
    assert_eq!(modes[..2], ["mtls", "insecure"], "encrypted and plaintext rows side by side");
    for r in rows {
        // The row's source report says how it was secured.
        let report: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(r["source_report"].as_str().unwrap()).unwrap()).unwrap();
        assert_eq!(report["security"]["mode"], r["security"], "{r}");
        // A uring row went through a ring on each side; the others through none.
        let dest: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(r["dest_report"].as_str().unwrap()).unwrap()).unwrap();
        let uring = r["send_path"] == "uring";
        for side in [&report, &dest] {
            assert_eq!(side["uring_requests"].as_u64().unwrap() > 0, uring, "{r}");
        }
        assert_eq!(r["verified"], true, "{r}");
        let (wire, base) = (r["wire_bps"].as_f64().unwrap(), r["baseline_bps"].as_f64().unwrap());
        assert!(wire > 0.0 && base > 0.0, "{r}");
        assert!((r["ratio"].as_f64().unwrap() - wire / base).abs() < 1e-9);
        // Three migrations, each with its baseline; the row's figures are the medians.
        let runs = r["runs"].as_array().unwrap();
        assert_eq!(runs.len(), 3, "{r}");
        assert!(runs.iter().all(|x| x["verified"] == true), "{r}");
        let median = |k: &str| {
            let mut v: Vec<f64> = runs.iter().map(|x| x[k].as_f64().unwrap()).collect();
            v.sort_by(f64::total_cmp);
            v[1]
        };
        assert_eq!((median("wire_bps"), median("baseline_bps")), (wire, base), "{r}");
        assert!(r["source_cpu_s_per_gb"].as_f64().unwrap() > 0.0 && r["dest_cpu_s_per_gb"].as_f64().unwrap() > 0.0);
        assert_eq!(r["used_path"], r["send_path"], "a fixed path is used as asked");
    }
    // Each row's plot: both charts' axes labelled, and one line per link in the throughput chart.
    for (links, path) in [(1, "copy"), (2, "vectored")] {
        let svg = std::fs::read_to_string(dir.join(format!("p-reference-{links}l-{path}-mtls.svg"))).unwrap();
        for label in ["time since the handshake (s)", "Gbit/s", "round", "pages sent (dirty pages)", "throttle %"] {
            assert!(svg.contains(label), "{links}l-{path}: no '{label}'");
        }
        for k in 1..=links {
            assert!(svg.contains(&format!("127.0.0.{k}&gt;127.0.0.1:")), "{links}l-{path}: link {k} has no line");
        }
        assert!(!svg.contains(&format!("127.0.0.{}&gt;", links + 1)), "{links}l-{path}: a line too many");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
