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
    // The parser wants a trailing newline and no `# EOF` (that is OpenMetrics).
    let owned;
    let text = if text.ends_with('\n') {
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
}
