//! Incremental parsing of OpenAI-style server-sent events (`data: {...}` lines, `data: [DONE]`).
//!
//! The load driver feeds body chunks as they arrive; chunk boundaries fall anywhere, so the
//! parser buffers partial lines. Only `data:` fields matter for OpenAI streams; comments, other
//! fields and blank separators are skipped.

/// One `data:` payload.
#[derive(Debug, PartialEq, Eq)]
pub enum SseData {
    /// A JSON chunk (not yet parsed).
    Json(String),
    /// The `[DONE]` sentinel.
    Done,
}

/// Buffers bytes and yields complete `data:` payloads.
#[derive(Debug, Default)]
pub struct SseParser {
    buf: Vec<u8>,
}

impl SseParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds bytes; returns the payloads of every line completed by them.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<SseData> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        let mut start = 0;
        while let Some(pos) = self.buf[start..].iter().position(|&b| b == b'\n') {
            let end = start + pos;
            if let Some(d) = parse_line(&self.buf[start..end]) {
                out.push(d);
            }
            start = end + 1;
        }
        self.buf.drain(..start);
        out
    }

    /// Flushes a final line that had no newline.
    pub fn finish(&mut self) -> Option<SseData> {
        let line = std::mem::take(&mut self.buf);
        parse_line(&line)
    }
}

fn parse_line(line: &[u8]) -> Option<SseData> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let rest = line.strip_prefix(b"data:")?;
    let rest = rest.strip_prefix(b" ").unwrap_or(rest);
    let text = String::from_utf8_lossy(rest).trim().to_owned();
    if text.is_empty() {
        return None;
    }
    if text == "[DONE]" {
        return Some(SseData::Done);
    }
    Some(SseData::Json(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_events_across_arbitrary_chunks() {
        let stream =
            b"data: {\"a\":1}\n\n: keepalive\nevent: x\ndata:{\"b\":2}\r\n\r\ndata: [DONE]\n\n";
        for cut in 1..stream.len() {
            let mut p = SseParser::new();
            let mut got = p.push(&stream[..cut]);
            got.extend(p.push(&stream[cut..]));
            got.extend(p.finish());
            assert_eq!(
                got,
                vec![
                    SseData::Json("{\"a\":1}".into()),
                    SseData::Json("{\"b\":2}".into()),
                    SseData::Done
                ],
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn final_line_without_newline_is_flushed() {
        let mut p = SseParser::new();
        assert!(p.push(b"data: [DO").is_empty());
        assert_eq!(p.push(b"NE]"), vec![]);
        assert_eq!(p.finish(), Some(SseData::Done));
        assert_eq!(p.finish(), None);
    }
}
