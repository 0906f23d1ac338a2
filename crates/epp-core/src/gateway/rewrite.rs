//! The model-rewrite body mutation and its reversal. When a request is routed as another model
//! (`x-llm-d-model-name-rewrite`), the body the model server receives names the target model,
//! and every response body the client receives names the model the client asked for again.

use memchr::memmem;

use crate::request::ParsedRequest;

/// The request body to forward: `None` when it goes out byte for byte (no rewrite, or nothing
/// to rewrite), else the body re-serialised with `model` set to the target model.
pub fn request_body(parsed: &ParsedRequest) -> Option<Vec<u8>> {
    if parsed.model == parsed.target_model || parsed.target_model.is_empty() {
        return None;
    }
    match &parsed.body {
        Some(serde_json::Value::Object(obj)) => {
            let mut obj = obj.clone();
            obj.insert(
                "model".into(),
                serde_json::Value::String(parsed.target_model.clone()),
            );
            serde_json::to_vec(&obj).ok()
        }
        _ => None,
    }
}

/// Puts the client's model name back into response bodies: `"model":"target"` (with or without
/// a space after the colon) becomes `"model":"incoming"`. Applied per body or per streamed chunk.
#[derive(Clone, Debug)]
pub struct ModelRestorer {
    pairs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl ModelRestorer {
    /// `None` when there is nothing to restore (no rewrite happened).
    pub fn new(incoming: &str, target: &str) -> Option<Self> {
        if incoming.is_empty() || target.is_empty() || incoming == target {
            return None;
        }
        let json = |s: &str| serde_json::to_string(s).unwrap_or_default();
        let (from, to) = (json(target), json(incoming));
        let pairs = [":", ": "]
            .iter()
            .map(|sep| {
                (
                    format!("\"model\"{sep}{from}").into_bytes(),
                    format!("\"model\"{sep}{to}").into_bytes(),
                )
            })
            .collect();
        Some(Self { pairs })
    }

    /// The same bytes with every occurrence replaced (untouched, no copy, when none occurs).
    pub fn apply(&self, body: Vec<u8>) -> Vec<u8> {
        let mut out = body;
        for (from, to) in &self.pairs {
            let finder = memmem::Finder::new(from);
            let mut hits = finder.find_iter(&out).peekable();
            if hits.peek().is_none() {
                continue;
            }
            let mut next = Vec::with_capacity(out.len() + to.len());
            let mut last = 0;
            for i in hits {
                next.extend_from_slice(&out[last..i]);
                next.extend_from_slice(to);
                last = i + from.len();
            }
            next.extend_from_slice(&out[last..]);
            out = next;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::{parse_body, ApiMethod};

    #[test]
    fn response_model_swapped_back() {
        let r = ModelRestorer::new("in", "t").unwrap();
        let b = br#"{"id":"x","model":"t","x":{"model": "t"},"m":"t","model":"tt"}"#.to_vec();
        assert_eq!(
            r.apply(b),
            br#"{"id":"x","model":"in","x":{"model": "in"},"m":"t","model":"tt"}"#.to_vec()
        );
        assert_eq!(r.apply(b"data: [DONE]".to_vec()), b"data: [DONE]");
        assert!(ModelRestorer::new("m", "m").is_none());
    }

    #[test]
    fn request_body_names_the_target() {
        let mut p = parse_body(
            ApiMethod::Completions,
            br#"{"model":"base","prompt":"hi","max_tokens":3}"#,
        )
        .unwrap();
        assert_eq!(request_body(&p), None);
        p.target_model = "lora-1".into();
        let out: serde_json::Value = serde_json::from_slice(&request_body(&p).unwrap()).unwrap();
        assert_eq!(
            out,
            serde_json::json!({"model":"lora-1","prompt":"hi","max_tokens":3})
        );
    }
}
