//! What a benchmark prints and saves: a side-by-side terminal table (one column per policy), a
//! JSON file with everything measured, and an SVG chart comparing policies on cache reuse, TTFT
//! p90 and balance. Plotters' SVG backend writes text as SVG `<text>`, so no font files are read.

use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::driver::LoadMode;
use crate::ideal::IdealBound;
use crate::picker_metrics::PickerStats;
use crate::stats::RunStats;
use crate::workload::WorkloadSpec;

/// One policy's results.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PolicyRun {
    /// Policy name (`round-robin`, `default`, a config file name, or `direct` for `--url`).
    pub policy: String,
    /// The ideal bound of the requests this run issued.
    pub ideal: IdealBound,
    pub stats: RunStats,
    /// The picker's own view, when its `/metrics` was scraped.
    pub picker: Option<PickerStats>,
    /// Why something is missing or unusual (e.g. "picker not available").
    pub note: Option<String>,
    /// What the in-process simulators counted (absent for `--url` runs).
    #[serde(default)]
    pub sims: Option<crate::compare::SimTotals>,
}

/// How the backends were set up for a comparison (absent for `--url` runs).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SetupInfo {
    pub backends: usize,
    /// KV-cache capacity of each simulated backend, in blocks.
    pub kv_blocks_per_backend: u64,
    /// Distinct blocks of the workload's requests (what an unlimited cache would hold).
    pub working_set_blocks: u64,
    pub max_num_seqs: usize,
    /// Simulator latency parameters, as JSON.
    pub latency: serde_json::Value,
    /// Picker replicas in front of the simulators.
    #[serde(default = "one")]
    pub replicas: usize,
    /// Seconds into each run at which the first simulator restarted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_backend_after_s: Option<f64>,
}

fn one() -> usize {
    1
}

/// Everything one `epp bench` (or `epp demo`) invocation measured.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BenchReport {
    pub workload: WorkloadSpec,
    pub seed: u64,
    pub mode: LoadMode,
    pub max_requests: Option<u64>,
    pub duration_s: Option<f64>,
    pub setup: Option<SetupInfo>,
    pub runs: Vec<PolicyRun>,
    /// The run was stopped early (Ctrl-C): results are partial.
    pub interrupted: bool,
    /// The routing-quality targets evaluated on these runs (see [`check_targets`]).
    #[serde(default)]
    pub targets: Vec<TargetCheck>,
}

/// Errors writing reports.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("cannot write {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot draw the chart: {0}")]
    Chart(String),
    #[error("cannot serialise the report: {0}")]
    Json(#[from] serde_json::Error),
}

fn pct(v: f64) -> String {
    format!("{:.1}%", v * 100.0)
}

fn ms(v: f64) -> String {
    format!("{:.1}", v * 1000.0)
}

type Cell = fn(&PolicyRun) -> String;

const ROWS: &[(&str, Cell)] = &[
    ("requests ok / issued", |r| {
        format!("{} / {}", r.stats.succeeded, r.stats.issued)
    }),
    ("cached-token ratio", |r| pct(r.stats.cached_token_ratio)),
    ("  ideal bound", |r| pct(r.ideal.ratio)),
    ("  share of ideal", |r| {
        if r.ideal.ratio > 0.0 {
            pct(r.stats.cached_token_ratio / r.ideal.ratio)
        } else {
            "n/a".into()
        }
    }),
    ("request hit rate", |r| pct(r.stats.request_hit_rate)),
    ("picker hit rate (epp_cache_*)", |r| match &r.picker {
        Some(p) if p.cache_requests > 0.0 => pct(p.cache_hit_rate),
        Some(_) => "0 requests".into(),
        None => "n/a".into(),
    }),
    ("TTFT p50 (ms)", |r| ms(r.stats.ttft.p50)),
    ("TTFT p90 (ms)", |r| ms(r.stats.ttft.p90)),
    ("TTFT p95 (ms)", |r| ms(r.stats.ttft.p95)),
    ("TTFT p99 (ms)", |r| ms(r.stats.ttft.p99)),
    ("ITL p50 (ms)", |r| ms(r.stats.itl.p50)),
    ("ITL p90 (ms)", |r| ms(r.stats.itl.p90)),
    ("ITL p99 (ms)", |r| ms(r.stats.itl.p99)),
    ("TPOT p50 (ms)", |r| ms(r.stats.tpot.p50)),
    ("TPOT p90 (ms)", |r| ms(r.stats.tpot.p90)),
    ("e2e p50 (ms)", |r| ms(r.stats.e2e.p50)),
    ("e2e p90 (ms)", |r| ms(r.stats.e2e.p90)),
    ("e2e p99 (ms)", |r| ms(r.stats.e2e.p99)),
    ("requests/s", |r| format!("{:.1}", r.stats.rps)),
    ("output tokens/s", |r| {
        format!("{:.0}", r.stats.output_tokens_per_s)
    }),
    ("balance max/mean", |r| {
        format!("{:.2}", r.stats.balance_max_over_mean)
    }),
    ("prompt tokens computed (sims)", |r| match &r.sims {
        Some(s) if r.stats.prompt_tokens > 0 => {
            pct(s.computed_prompt_tokens as f64 / r.stats.prompt_tokens as f64)
        }
        Some(s) => s.computed_prompt_tokens.to_string(),
        None => "n/a".into(),
    }),
    ("P/D prefills (prefill sims)", |r| match &r.sims {
        Some(s) => s.kv_transfer_prefills.to_string(),
        None => "n/a".into(),
    }),
];

const TAIL_ROWS: &[(&str, Cell)] = &[
    ("errors", |r| {
        if r.stats.errors.is_empty() {
            "0".into()
        } else {
            r.stats
                .errors
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" ")
        }
    }),
    ("precise scores from approximate", |r| {
        match r.picker.as_ref().and_then(|p| p.precise_fallbacks) {
            Some(n) => format!("{n:.0}"),
            None => "n/a".into(),
        }
    }),
    ("picker decision mean (us)", |r| match &r.picker {
        Some(p) if p.decision_count > 0.0 => format!("{:.1}", p.decision_mean_s * 1e6),
        _ => "n/a".into(),
    }),
    ("picker decision p99 (us)", |r| match &r.picker {
        Some(p) if p.decision_count > 0.0 => format!("{:.1}", p.decision_p99_s * 1e6),
        _ => "n/a".into(),
    }),
];

/// The side-by-side table, one column per policy.
pub fn render_table(report: &BenchReport) -> String {
    let mut rows: Vec<(String, Vec<String>)> = Vec::new();
    let runs = &report.runs;
    for (label, f) in ROWS {
        rows.push((label.to_string(), runs.iter().map(f).collect()));
    }
    let mut backends: Vec<String> = Vec::new();
    for r in runs {
        for b in &r.stats.backends {
            if !backends.contains(&b.name) {
                backends.push(b.name.clone());
            }
        }
    }
    for b in &backends {
        rows.push((
            format!("share {b}"),
            runs.iter()
                .map(|r| {
                    r.stats
                        .backends
                        .iter()
                        .find(|s| &s.name == b)
                        .map_or_else(|| "0.0%".into(), |s| pct(s.share))
                })
                .collect(),
        ));
    }
    for (label, f) in TAIL_ROWS {
        rows.push((label.to_string(), runs.iter().map(f).collect()));
    }

    let label_w = rows.iter().map(|(l, _)| l.len()).max().unwrap_or(0);
    let col_w: Vec<usize> = runs
        .iter()
        .enumerate()
        .map(|(i, r)| {
            rows.iter()
                .map(|(_, c)| c[i].len())
                .chain([r.policy.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "workload {} (seed {}){}",
        report.workload.name(),
        report.seed,
        if report.interrupted {
            "  [interrupted: partial results]"
        } else {
            ""
        }
    );
    let mut line = format!("{:label_w$}", "");
    for (r, w) in runs.iter().zip(&col_w) {
        let _ = write!(line, "  {:>w$}", r.policy);
    }
    let _ = writeln!(out, "{}", line.trim_end());
    let total: usize = label_w + col_w.iter().map(|w| w + 2).sum::<usize>();
    let _ = writeln!(out, "{}", "-".repeat(total));
    for (label, cells) in &rows {
        let mut line = format!("{label:label_w$}");
        for (c, w) in cells.iter().zip(&col_w) {
            let _ = write!(line, "  {c:>w$}");
        }
        let _ = writeln!(out, "{line}");
    }
    for r in runs {
        if let Some(n) = &r.note {
            let _ = writeln!(out, "note ({}): {n}", r.policy);
        }
    }
    out
}

/// One routing-quality target (cache reuse against the ideal and round-robin, hot-spot spread),
/// evaluated on a report.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TargetCheck {
    pub name: String,
    pub measured: String,
    pub target: String,
    pub pass: bool,
}

fn run<'a>(report: &'a BenchReport, policy: &str) -> Option<&'a PolicyRun> {
    report.runs.iter().find(|r| r.policy == policy)
}

/// The targets that apply to this report's workload and policies: on shared-prefix, the default
/// profile against the ideal bound and round-robin; on hot-spot, the default profile's largest
/// backend share and its hit ratio against prefix-only. Empty when the needed policies are absent.
pub fn check_targets(report: &BenchReport) -> Vec<TargetCheck> {
    let mut out = Vec::new();
    let Some(def) = run(report, "default") else {
        return out;
    };
    let max_share = def
        .stats
        .backends
        .iter()
        .map(|b| b.share)
        .fold(0.0, f64::max);
    match report.workload {
        WorkloadSpec::SharedPrefix(_) => {
            if def.ideal.ratio > 0.0 {
                let share = def.stats.cached_token_ratio / def.ideal.ratio;
                out.push(TargetCheck {
                    name: "default: cached-token ratio vs ideal bound".into(),
                    measured: pct(share),
                    target: ">= 85.0%".into(),
                    pass: share >= 0.85,
                });
            }
            if let Some(rr) = run(report, "round-robin") {
                let (d, r) = (def.stats.ttft.p90, rr.stats.ttft.p90);
                out.push(TargetCheck {
                    name: "default: TTFT p90 vs round-robin's".into(),
                    measured: format!("{} / {} ms = 1/{:.1}", ms(d), ms(r), r / d.max(1e-9)),
                    target: "<= 1/5".into(),
                    pass: d > 0.0 && d * 5.0 <= r,
                });
            }
            out.push(TargetCheck {
                name: "default: balance max/mean".into(),
                measured: format!("{:.2}", def.stats.balance_max_over_mean),
                target: "<= 1.30".into(),
                pass: def.stats.balance_max_over_mean <= 1.3,
            });
        }
        WorkloadSpec::HotSpot(_) => {
            out.push(TargetCheck {
                name: "default: largest backend share".into(),
                measured: pct(max_share),
                target: "<= 60.0%".into(),
                pass: max_share <= 0.6,
            });
            if let Some(po) = run(report, "prefix-only") {
                let gap = (po.stats.cached_token_ratio - def.stats.cached_token_ratio) * 100.0;
                out.push(TargetCheck {
                    name: "default: cached-token ratio below prefix-only's".into(),
                    measured: format!("{gap:.1} points"),
                    target: "<= 10 points".into(),
                    pass: gap <= 10.0,
                });
            }
        }
        _ => {}
    }
    out
}

/// The target checks as text lines (empty when none apply).
pub fn render_targets(checks: &[TargetCheck]) -> String {
    let mut out = String::new();
    if checks.is_empty() {
        return out;
    }
    let _ = writeln!(out, "routing-quality targets:");
    for c in checks {
        let _ = writeln!(
            out,
            "  [{}] {}: {} (target {})",
            if c.pass { "pass" } else { "MISS" },
            c.name,
            c.measured,
            c.target
        );
    }
    out
}

/// Writes the report as pretty JSON.
pub fn write_json(report: &BenchReport, path: &Path) -> Result<(), ReportError> {
    let text = serde_json::to_string_pretty(report)?;
    std::fs::write(path, text).map_err(|source| ReportError::Io {
        path: path.display().to_string(),
        source,
    })
}

/// Writes the comparison chart as SVG.
pub fn write_svg(report: &BenchReport, path: &Path) -> Result<(), ReportError> {
    let svg = render_svg(report)?;
    std::fs::write(path, svg).map_err(|source| ReportError::Io {
        path: path.display().to_string(),
        source,
    })
}

/// Renders the comparison chart: three bar panels (cached-token ratio with the ideal bound as a
/// line, TTFT p90, balance max/mean with 1.0 as the even line).
pub fn render_svg(report: &BenchReport) -> Result<String, ReportError> {
    use plotters::prelude::*;
    let chart_err = |e: &dyn std::fmt::Display| ReportError::Chart(e.to_string());
    let names: Vec<String> = report.runs.iter().map(|r| r.policy.clone()).collect();
    let hit: Vec<f64> = report
        .runs
        .iter()
        .map(|r| r.stats.cached_token_ratio * 100.0)
        .collect();
    let ttft: Vec<f64> = report
        .runs
        .iter()
        .map(|r| r.stats.ttft.p90 * 1000.0)
        .collect();
    let bal: Vec<f64> = report
        .runs
        .iter()
        .map(|r| r.stats.balance_max_over_mean)
        .collect();
    let ideal = report
        .runs
        .iter()
        .map(|r| r.ideal.ratio * 100.0)
        .fold(0.0, f64::max);

    let mut buf = String::new();
    {
        let root = SVGBackend::with_string(&mut buf, (1500, 480)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| chart_err(&e))?;
        let title = format!(
            "epp bench: {} workload, seed {}{}",
            report.workload.name(),
            report.seed,
            if report.interrupted { " (partial)" } else { "" }
        );
        let root = root
            .titled(&title, ("sans-serif", 22))
            .map_err(|e| chart_err(&e))?;
        let panels = root.split_evenly((1, 3));
        bar_panel(
            &panels[0],
            "cached-token ratio (%), dashed: ideal bound",
            &names,
            &hit,
            Some(ideal),
            100.0,
            |v| format!("{v:.1}"),
        )
        .map_err(|e| chart_err(&e))?;
        let tmax = ttft.iter().copied().fold(0.0, f64::max).max(1e-3) * 1.2;
        bar_panel(
            &panels[1],
            "TTFT p90 (ms), lower is better",
            &names,
            &ttft,
            None,
            tmax,
            |v| format!("{v:.0}"),
        )
        .map_err(|e| chart_err(&e))?;
        let bmax = bal.iter().copied().fold(1.0, f64::max) * 1.2;
        bar_panel(
            &panels[2],
            "balance: max/mean backend share (1 = even)",
            &names,
            &bal,
            Some(1.0),
            bmax,
            |v| format!("{v:.2}"),
        )
        .map_err(|e| chart_err(&e))?;
        root.present().map_err(|e| chart_err(&e))?;
    }
    Ok(buf)
}

const PALETTE: [plotters::style::RGBColor; 6] = [
    plotters::style::RGBColor(0x4e, 0x79, 0xa7),
    plotters::style::RGBColor(0xf2, 0x8e, 0x2b),
    plotters::style::RGBColor(0xe1, 0x57, 0x59),
    plotters::style::RGBColor(0x76, 0xb7, 0xb2),
    plotters::style::RGBColor(0x59, 0xa1, 0x4f),
    plotters::style::RGBColor(0xb0, 0x7a, 0xa1),
];

type Area<'a> =
    plotters::drawing::DrawingArea<plotters::prelude::SVGBackend<'a>, plotters::coord::Shift>;

fn bar_panel(
    area: &Area<'_>,
    title: &str,
    names: &[String],
    values: &[f64],
    reference: Option<f64>,
    ymax: f64,
    fmt: impl Fn(f64) -> String,
) -> Result<(), Box<dyn std::error::Error + 'static>> {
    use plotters::prelude::*;
    let n = names.len().max(1) as u32;
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 15))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d((0..n).into_segmented(), 0.0..ymax)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .light_line_style(WHITE)
        .x_labels(names.len().max(1))
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => names.get(*i as usize).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .x_label_style(("sans-serif", 12))
        .y_label_formatter(&|y| fmt(*y))
        .draw()
        .map_err(|e| e.to_string())?;
    chart
        .draw_series(values.iter().enumerate().map(|(i, v)| {
            let i = i as u32;
            let color = PALETTE[i as usize % PALETTE.len()];
            let mut bar = Rectangle::new(
                [
                    (SegmentValue::Exact(i), 0.0),
                    (SegmentValue::Exact(i + 1), *v),
                ],
                color.filled(),
            );
            bar.set_margin(0, 0, 10, 10);
            bar
        }))
        .map_err(|e| e.to_string())?;
    let label_style = TextStyle::from(("sans-serif", 12).into_font()).pos(
        plotters::style::text_anchor::Pos::new(
            plotters::style::text_anchor::HPos::Center,
            plotters::style::text_anchor::VPos::Bottom,
        ),
    );
    chart
        .draw_series(values.iter().enumerate().map(|(i, v)| {
            Text::new(
                fmt(*v),
                (SegmentValue::CenterOf(i as u32), *v),
                label_style.clone(),
            )
        }))
        .map_err(|e| e.to_string())?;
    if let Some(r) = reference {
        let dashed = DashedLineSeries::new(
            vec![(SegmentValue::Exact(0), r), (SegmentValue::Exact(n), r)],
            6,
            4,
            BLACK.stroke_width(1),
        );
        chart.draw_series(dashed).map_err(|e| e.to_string())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::{BackendShare, Percentiles};
    use crate::workload::SharedPrefix;

    pub(crate) fn sample_report() -> BenchReport {
        let run = |policy: &str, ratio: f64, p90: f64, bal: f64| PolicyRun {
            policy: policy.into(),
            ideal: IdealBound {
                ratio: 0.9,
                ..IdealBound::default()
            },
            stats: RunStats {
                issued: 10,
                succeeded: 10,
                cached_token_ratio: ratio,
                ttft: Percentiles {
                    p90,
                    ..Percentiles::default()
                },
                balance_max_over_mean: bal,
                backends: vec![BackendShare {
                    name: "sim-0".into(),
                    requests: 10,
                    share: 1.0,
                }],
                ..RunStats::default()
            },
            picker: None,
            note: None,
            sims: None,
        };
        BenchReport {
            workload: WorkloadSpec::SharedPrefix(SharedPrefix::default()),
            seed: 1,
            mode: LoadMode::ClosedLoop { concurrency: 4 },
            max_requests: Some(10),
            duration_s: None,
            setup: None,
            runs: vec![
                run("round-robin", 0.2, 0.25, 1.0),
                run("default", 0.81, 0.02, 1.1),
            ],
            interrupted: false,
            targets: vec![],
        }
    }

    #[test]
    fn targets_are_evaluated_on_values() {
        let mut r = sample_report();
        let checks = check_targets(&r);
        assert_eq!(checks.len(), 3);
        // 0.81 / 0.9 = 90% of ideal; 20 ms vs 250 ms = 1/12.5; balance 1.1.
        assert_eq!(checks[0].measured, "90.0%");
        assert!(checks.iter().all(|c| c.pass), "{checks:?}");
        r.runs[1].stats.ttft.p90 = 0.06;
        let checks = check_targets(&r);
        assert!(!checks[1].pass);
        assert_eq!(checks[1].measured, "60.0 / 250.0 ms = 1/4.2");
        assert!(render_targets(&checks).contains("[MISS] default: TTFT p90"));
        r.runs.retain(|x| x.policy != "default");
        assert!(check_targets(&r).is_empty());
    }

    #[test]
    fn table_has_a_column_per_policy_with_values() {
        let t = render_table(&sample_report());
        let header = t.lines().nth(1).unwrap();
        assert!(
            header.contains("round-robin") && header.contains("default"),
            "{t}"
        );
        let row = t
            .lines()
            .find(|l| l.starts_with("cached-token ratio"))
            .unwrap();
        assert!(
            row.ends_with("20.0%        81.0%") || row.contains("20.0%"),
            "{row}"
        );
        assert!(row.trim_end().ends_with("81.0%"), "{row}");
        let share = t
            .lines()
            .find(|l| l.starts_with("  share of ideal"))
            .unwrap();
        assert!(share.trim_end().ends_with("90.0%"), "{share}");
        let p90 = t.lines().find(|l| l.starts_with("TTFT p90")).unwrap();
        assert!(
            p90.contains("250.0") && p90.trim_end().ends_with("20.0"),
            "{p90}"
        );
        assert!(t.lines().any(|l| l.starts_with("share sim-0")));
    }

    #[test]
    fn svg_names_every_policy_and_round_trips_json() {
        let r = sample_report();
        let svg = render_svg(&r).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..100]);
        let texts: Vec<&str> = svg.lines().map(str::trim).collect();
        // Each panel labels both bars and prints their values.
        assert_eq!(texts.iter().filter(|l| **l == "round-robin").count(), 3);
        assert_eq!(texts.iter().filter(|l| **l == "default").count(), 3);
        assert!(texts.contains(&"81.0") && texts.contains(&"250") && texts.contains(&"1.10"));
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.json");
        write_json(&r, &p).unwrap();
        let back: BenchReport =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        assert_eq!(back, r);
    }
}
