//! Reading Prometheus text expositions (model-server `/metrics`, our own `/metrics` in tests and
//! benchmarks) through the maintained `openmetrics-parser` crate, flattened into plain samples:
//! histograms become their `_bucket{le}`, `_sum` and `_count` series as they appear on the wire.

use std::collections::BTreeMap;

use openmetrics_parser::{MetricNumber, PrometheusValue};

/// One series and its value.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, k: &str) -> Option<&str> {
        self.labels.get(k).map(String::as_str)
    }
}

fn num(n: &MetricNumber) -> f64 {
    n.as_f64()
}

/// Parse an exposition. Errors carry the parser's message.
pub fn parse(text: &str) -> Result<Vec<Sample>, String> {
    // The parser wants a trailing newline and no `# EOF` (OpenMetrics' terminator, which some
    // encoders append to text they serve as Prometheus 0.0.4): cut it.
    let text = match text.rfind("# EOF") {
        Some(i) if text[i..].trim() == "# EOF" && (i == 0 || text.as_bytes()[i - 1] == b'\n') => {
            &text[..i]
        }
        _ => text,
    };
    let owned;
    let text = if text.is_empty() || text.ends_with('\n') {
        text
    } else {
        owned = format!("{text}\n");
        &owned
    };
    let exp = openmetrics_parser::prometheus::parse_prometheus(text)
        .map_err(|e| format!("unparsable exposition: {e:?}"))?;
    let mut out = Vec::new();
    for (fname, fam) in &exp.families {
        for s in fam.iter_samples() {
            let labels: BTreeMap<String, String> = match s.get_labelset() {
                Ok(ls) => ls.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                Err(e) => return Err(format!("{fname}: bad labels: {e:?}")),
            };
            match &s.value {
                PrometheusValue::Unknown(n) | PrometheusValue::Gauge(n) => out.push(Sample {
                    name: fname.clone(),
                    labels,
                    value: num(n),
                }),
                PrometheusValue::Counter(c) => out.push(Sample {
                    name: fname.clone(),
                    labels,
                    value: num(&c.value),
                }),
                PrometheusValue::Histogram(h) => {
                    for b in &h.buckets {
                        let mut l = labels.clone();
                        let le = if b.upper_bound.is_infinite() {
                            "+Inf".to_string()
                        } else {
                            b.upper_bound.to_string()
                        };
                        l.insert("le".into(), le);
                        out.push(Sample {
                            name: format!("{fname}_bucket"),
                            labels: l,
                            value: num(&b.count),
                        });
                    }
                    if let Some(sum) = &h.sum {
                        out.push(Sample {
                            name: format!("{fname}_sum"),
                            labels: labels.clone(),
                            value: num(sum),
                        });
                    }
                    if let Some(c) = h.count {
                        out.push(Sample {
                            name: format!("{fname}_count"),
                            labels,
                            value: c as f64,
                        });
                    }
                }
                PrometheusValue::Summary(sv) => {
                    if let Some(sum) = &sv.sum {
                        out.push(Sample {
                            name: format!("{fname}_sum"),
                            labels: labels.clone(),
                            value: num(sum),
                        });
                    }
                    if let Some(c) = sv.count {
                        out.push(Sample {
                            name: format!("{fname}_count"),
                            labels,
                            value: c as f64,
                        });
                    }
                }
            }
        }
    }
    Ok(out)
}

/// The name a sample line reports under (up to `{` or the first blank), or `None` for blank
/// lines.
fn sample_name(line: &str) -> Option<&str> {
    let end = line
        .find(|c: char| c == '{' || c.is_ascii_whitespace())
        .unwrap_or(line.len());
    (end > 0).then(|| &line[..end])
}

/// Suffixes a family's series carry on the wire (histograms, summaries, counters).
const SERIES_SUFFIXES: [&str; 6] = ["_bucket", "_sum", "_count", "_total", "_created", "_info"];

fn wanted(name: &str, families: &[&str]) -> bool {
    families.iter().any(|f| {
        name.strip_prefix(f)
            .is_some_and(|rest| rest.is_empty() || SERIES_SUFFIXES.contains(&rest))
    })
}

/// The lines of `text` that belong to `families` (their `# HELP` / `# TYPE` lines and samples),
/// in their original order. Other comments and blank lines are dropped.
pub fn select_families(text: &str, families: &[&str]) -> String {
    let mut out = String::with_capacity(512);
    for line in text.lines() {
        let keep = match line.strip_prefix('#') {
            Some(comment) => {
                let mut words = comment.split_ascii_whitespace();
                matches!(words.next(), Some("HELP" | "TYPE"))
                    && words.next().is_some_and(|n| families.contains(&n))
            }
            None => sample_name(line.trim_start()).is_some_and(|n| wanted(n, families)),
        };
        if keep {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// [`parse`] restricted to `families`: lines of every other family are skipped before the
/// parser sees them, so a model server's large exposition (hundreds of histogram buckets) costs
/// a line scan instead of a full parse. Errors in skipped lines go unnoticed by design.
pub fn parse_families(text: &str, families: &[&str]) -> Result<Vec<Sample>, String> {
    let selected = select_families(text, families);
    if selected.is_empty() {
        return Ok(Vec::new());
    }
    parse(&selected)
}

/// Sum of the samples named `name` whose labels include every `(k, v)` in `matchers`.
pub fn sum(samples: &[Sample], name: &str, matchers: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name && matchers.iter().all(|(k, v)| s.label(k) == Some(*v)))
        .map(|s| s.value)
        .sum()
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_trailing_eof_terminator_is_accepted() {
        let t = "# TYPE a_total counter\na_total{x=\"1\"} 2\n# EOF\n";
        let s = super::parse(t).unwrap();
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].value, 2.0);
    }

    use super::*;

    #[test]
    fn parses_colons_counters_and_histograms() {
        let text = "# HELP vllm:num_requests_waiting w\n# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{model_name=\"m\"} 3\n# TYPE vllm:request_success_total counter\nvllm:request_success_total{finished_reason=\"length\"} 5\n# TYPE x_seconds histogram\nx_seconds_bucket{le=\"0.1\"} 1\nx_seconds_bucket{le=\"+Inf\"} 2\nx_seconds_sum 0.3\nx_seconds_count 2\n";
        let s = parse(text).unwrap();
        assert_eq!(
            sum(&s, "vllm:num_requests_waiting", &[("model_name", "m")]),
            3.0
        );
        assert_eq!(sum(&s, "vllm:request_success_total", &[]), 5.0);
        assert_eq!(sum(&s, "x_seconds_bucket", &[("le", "+Inf")]), 2.0);
        assert_eq!(sum(&s, "x_seconds_count", &[]), 2.0);
        assert_eq!(sum(&s, "x_seconds_sum", &[]), 0.3);
    }

    #[test]
    fn selected_families_parse_like_the_whole_exposition() {
        let text = "# HELP vllm:num_requests_waiting w\n# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{model_name=\"m\"} 3\n\n# HELP vllm:num_requests_waiting_x lookalike\n# TYPE vllm:num_requests_waiting_x gauge\nvllm:num_requests_waiting_x 9\n# TYPE vllm:request_success_total counter\nvllm:request_success_total{finished_reason=\"length\"} 5\n# TYPE x_seconds histogram\nx_seconds_bucket{le=\"0.1\"} 1\nx_seconds_bucket{le=\"+Inf\"} 2\nx_seconds_sum 0.3\nx_seconds_count 2\n";
        let picked = select_families(text, &["vllm:num_requests_waiting", "x_seconds"]);
        assert_eq!(
            picked,
            "# HELP vllm:num_requests_waiting w\n# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{model_name=\"m\"} 3\n# TYPE x_seconds histogram\nx_seconds_bucket{le=\"0.1\"} 1\nx_seconds_bucket{le=\"+Inf\"} 2\nx_seconds_sum 0.3\nx_seconds_count 2\n"
        );
        let all = parse(text).unwrap();
        let some = parse_families(text, &["vllm:num_requests_waiting", "x_seconds"]).unwrap();
        let of = |v: &[Sample], n: &str| -> Vec<Sample> {
            v.iter()
                .filter(|s| s.name.starts_with(n))
                .cloned()
                .collect()
        };
        assert_eq!(some.len(), 5);
        assert_eq!(of(&some, "x_seconds"), of(&all, "x_seconds"));
        assert_eq!(sum(&some, "vllm:num_requests_waiting", &[]), 3.0);
        assert_eq!(sum(&some, "vllm:num_requests_waiting_x", &[]), 0.0);
        // Nothing wanted: an empty (valid) exposition.
        assert!(parse_families(text, &["absent"]).unwrap().is_empty());
    }
}
