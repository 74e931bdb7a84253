//! `--plot FILE.svg`: one migration drawn from its report: wire throughput per link over time (one line per link),
//! the pages sent and the vCPU throttle per round, and, after a post-copy switch, the fault latency histogram.
//!
//! The data comes from the report ([`PlotData::from_report`], read back from its JSON where another process wrote it), so `demo`, `send`, `lab run` and `bench` draw the
//! same picture from the same file format. SVG only (plotters' SVG backend): no font files, no bitmap libraries.

use crate::report::Report;
use plotters::prelude::*;
use std::path::Path;

/// What the plot shows.
#[derive(Debug, Clone, Default)]
pub struct PlotData {
    /// Link names, in link order.
    pub links: Vec<String>,
    /// Per link: (seconds since the start, Gbit/s over the sample before it).
    pub throughput: Vec<Vec<(f64, f64)>>,
    /// Per round: (index, pages sent, throttle percent).
    pub rounds: Vec<(u32, u64, f64)>,
    /// Post-copy's fault latency: (bucket's upper bound in µs, faults), powers of two; empty without post-copy.
    pub fault_latency: Vec<(u64, u64)>,
}

/// Why a plot could not be drawn.
#[derive(Debug, thiserror::Error)]
#[error("plot {path}: {why}")]
pub struct PlotError {
    path: String,
    why: String,
}

impl PlotData {
    /// Reads the plot's data from a report.
    pub fn from_report(r: &Report) -> PlotData {
        let links: Vec<String> = r.links.iter().map(|l| l.name.clone()).collect();
        let mut throughput = vec![Vec::new(); links.len()];
        for w in r.timeline.windows(2) {
            let ((t0, b0), (t1, b1)) = (&w[0], &w[1]);
            let dt = t1 - t0;
            // The closing sample can follow the last by a few milliseconds: too short a span to be a rate.
            if dt < 0.05 {
                continue;
            }
            for (k, series) in throughput.iter_mut().enumerate() {
                let d = b1.get(k).copied().unwrap_or(0).saturating_sub(b0.get(k).copied().unwrap_or(0));
                series.push((*t1, d as f64 * 8.0 / dt / 1e9));
            }
        }
        let rounds = r.rounds.iter().map(|x| (x.index, x.dirty_pages, x.throttle_pct)).collect();
        let fault_latency = r.postcopy.as_ref().map(|p| p.fault_latency_histogram.clone()).unwrap_or_default();
        PlotData { links, throughput, rounds, fault_latency }
    }
}

/// Draws `d` into the SVG file `path`.
pub fn draw(d: &PlotData, path: &Path) -> Result<(), PlotError> {
    let err = |e: &dyn std::fmt::Display| PlotError { path: path.display().to_string(), why: e.to_string() };
    let height = if d.fault_latency.is_empty() { 720 } else { 1020 };
    let root = SVGBackend::new(path, (1000, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (top, rest) = root.split_vertically(420);
    let (bottom, faults) = rest.split_vertically(300);
    if !d.fault_latency.is_empty() {
        draw_faults(&d.fault_latency, &faults).map_err(|e| err(&e))?;
    }

    let t_max = d.throughput.iter().flatten().map(|p| p.0).fold(0.1, f64::max);
    let g_max = d.throughput.iter().flatten().map(|p| p.1).fold(0.1, f64::max) * 1.15;
    let mut chart = ChartBuilder::on(&top)
        .caption("Wire throughput per link", ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(75)
        .build_cartesian_2d(0f64..t_max, 0f64..g_max)
        .map_err(|e| err(&e))?;
    chart.configure_mesh().x_desc("time since the handshake (s)").y_desc("Gbit/s").draw().map_err(|e| err(&e))?;
    for (k, series) in d.throughput.iter().enumerate() {
        let color = Palette99::pick(k).to_rgba();
        let name = d.links.get(k).cloned().unwrap_or_else(|| format!("link {k}"));
        chart
            .draw_series(LineSeries::new(series.iter().copied(), color.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw().map_err(|e| err(&e))?;

    let r_max = d.rounds.iter().map(|r| r.0).max().unwrap_or(0) as f64 + 0.5;
    let p_max = d.rounds.iter().map(|r| r.1).max().unwrap_or(1).max(1) as f64 * 1.15;
    let mut chart = ChartBuilder::on(&bottom)
        .caption("Pages sent and vCPU throttle per round", ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(75)
        .right_y_label_area_size(60)
        .build_cartesian_2d(-0.5f64..r_max, 0f64..p_max)
        .map_err(|e| err(&e))?
        .set_secondary_coord(-0.5f64..r_max, 0f64..100f64);
    chart
        .configure_mesh()
        .x_desc("round")
        .y_desc("pages sent (dirty pages)")
        .x_labels(d.rounds.len() * 2 + 2)
        .x_label_formatter(&|x| {
            if (x - x.round()).abs() < 1e-6 && *x >= 0.0 {
                format!("{x:.0}")
            } else {
                String::new()
            }
        })
        .y_label_formatter(&|y| if *y >= 1000.0 { format!("{:.0}k", y / 1000.0) } else { format!("{y:.0}") })
        .draw()
        .map_err(|e| err(&e))?;
    chart.configure_secondary_axes().y_desc("throttle %").draw().map_err(|e| err(&e))?;
    let pages: Vec<(f64, f64)> = d.rounds.iter().map(|r| (f64::from(r.0), r.1 as f64)).collect();
    chart
        .draw_series(LineSeries::new(pages.iter().copied(), BLUE.stroke_width(2)))
        .map_err(|e| err(&e))?
        .label("pages sent")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    chart.draw_series(pages.iter().map(|&p| Circle::new(p, 4, BLUE.filled()))).map_err(|e| err(&e))?;
    let throttle: Vec<(f64, f64)> = d.rounds.iter().map(|r| (f64::from(r.0), r.2)).collect();
    chart
        .draw_secondary_series(LineSeries::new(throttle.iter().copied(), RED.stroke_width(2)))
        .map_err(|e| err(&e))?
        .label("throttle %")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(2)));
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw().map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// Post-copy's fault latency histogram: one bar per power-of-two bucket, from the first to the last that has faults.
fn draw_faults(hist: &[(u64, u64)], area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>) -> Result<(), String> {
    let e = |x: &dyn std::fmt::Display| x.to_string();
    let bucket = |upper: u64| i32::try_from(upper.max(1).ilog2()).unwrap_or(0);
    let (lo, hi) = (hist.first().map_or(0, |b| bucket(b.0)), hist.last().map_or(0, |b| bucket(b.0)));
    let c_max = hist.iter().map(|b| b.1).max().unwrap_or(1) as f64 * 1.15;
    let mut chart = ChartBuilder::on(area)
        .caption("Post-copy fault latency (fault to page placed)", ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(75)
        .build_cartesian_2d((lo - 2)..(hi + 1), 0f64..c_max)
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .x_desc("latency up to (µs)")
        .y_desc("faults")
        .x_labels(usize::try_from(hi - lo + 4).unwrap_or(4))
        .x_label_formatter(&|b| if *b >= 0 { format!("{}", 1u64 << b) } else { String::new() })
        .draw()
        .map_err(|x| e(&x))?;
    let bars = hist.iter().map(|&(upper, n)| {
        let b = bucket(upper);
        // The bucket holds latencies up to 2^b µs: its bar ends at the tick labelled so.
        Rectangle::new([(b - 1, 0.0), (b, n as f64)], BLUE.mix(0.6).filled())
    });
    chart.draw_series(bars).map_err(|x| e(&x))?;
    Ok(())
}
