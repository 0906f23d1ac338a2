//! The multipart framing of the KV-event stream and of its replay socket.
//!
//! Live messages on the PUB socket are three frames: topic, sequence number (8 bytes, big-endian,
//! counting from 0 per publisher process), msgpack payload. The optional ROUTER replay socket takes
//! a request `[start_seq]` (8 bytes, big-endian) and answers with every buffered batch from that
//! sequence on, one message each, then an end marker whose sequence is -1 and whose payload is
//! empty. vLLM has answered both `[seq, payload]` and `[topic, seq, payload]`; both are accepted,
//! with or without the empty delimiter frame a DEALER sees first.

use super::decode::DecodeError;

/// vLLM's default port for the PUB socket.
pub const DEFAULT_PORT: u16 = 5557;
/// vLLM's default PUB endpoint (it binds when the endpoint has a wildcard).
pub const DEFAULT_ENDPOINT: &str = "tcp://*:5557";
/// vLLM's default replay buffer length, in batches (`buffer_steps`).
pub const DEFAULT_BUFFER_STEPS: usize = 10_000;
/// The sequence of the replay end marker: -1 as a signed 8-byte big-endian integer.
pub const END_SEQ: [u8; 8] = [0xff; 8];

/// Reads an 8-byte big-endian sequence frame.
pub fn parse_seq(frame: &[u8]) -> Result<u64, DecodeError> {
    let bytes: [u8; 8] = frame
        .try_into()
        .map_err(|_| DecodeError::SequenceLength(frame.len()))?;
    Ok(u64::from_be_bytes(bytes))
}

/// The request frame asking the replay socket for every batch from `start_seq` on. A DEALER
/// sends an empty delimiter frame before it, so the ROUTER sees `[identity, "", start_seq]`.
pub fn replay_request(start_seq: u64) -> [u8; 8] {
    start_seq.to_be_bytes()
}

/// The live frames: topic, sequence, payload (not decoded yet).
pub fn split_live(frames: &[impl AsRef<[u8]>]) -> Result<(&str, u64, &[u8]), DecodeError> {
    let [topic, seq, payload] = frames else {
        return Err(DecodeError::FrameCount(frames.len()));
    };
    let topic = std::str::from_utf8(topic.as_ref()).map_err(|_| DecodeError::TopicNotUtf8)?;
    Ok((topic, parse_seq(seq.as_ref())?, payload.as_ref()))
}

/// One message read from the replay socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplayFrame<'a> {
    /// A buffered batch; `topic` when this publisher version sends it.
    Batch {
        topic: Option<&'a str>,
        seq: u64,
        payload: &'a [u8],
    },
    /// Nothing more after this.
    End,
}

/// Reads one replay answer: `[""]? [topic]? seq payload`; the end marker has sequence -1 and an
/// empty payload.
pub fn parse_replay(frames: &[impl AsRef<[u8]>]) -> Result<ReplayFrame<'_>, DecodeError> {
    let mut frames = frames;
    // Four frames: the ROUTER's empty delimiter, then topic, sequence, payload. Three frames
    // whose first is empty read the same either way (a delimiter before `[seq, payload]`, or an
    // empty topic), so only the four-frame shape is stripped.
    if frames.len() == 4 {
        if !frames[0].as_ref().is_empty() {
            return Err(DecodeError::ReplayDelimiter);
        }
        frames = &frames[1..];
    }
    let (topic, seq, payload) = match frames {
        [seq, payload] => (None, seq.as_ref(), payload.as_ref()),
        [topic, seq, payload] => {
            let t = std::str::from_utf8(topic.as_ref()).map_err(|_| DecodeError::TopicNotUtf8)?;
            (Some(t), seq.as_ref(), payload.as_ref())
        }
        _ => return Err(DecodeError::FrameCount(frames.len())),
    };
    if seq == END_SEQ && payload.is_empty() {
        return Ok(ReplayFrame::End);
    }
    let seq = parse_seq(seq)?;
    Ok(ReplayFrame::Batch {
        topic: topic.filter(|t| !t.is_empty()),
        seq,
        payload,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_frames_split_into_topic_sequence_and_payload() {
        let frames: [&[u8]; 3] = [b"kv@p@m", &[0, 0, 0, 0, 0, 0, 1, 2], b"\x93"];
        assert_eq!(split_live(&frames).unwrap(), ("kv@p@m", 258, &b"\x93"[..]));
        let two: [&[u8]; 2] = [b"kv@p@m", &[0; 8]];
        assert_eq!(split_live(&two).unwrap_err(), DecodeError::FrameCount(2));
        let short: [&[u8]; 3] = [b"t", &[0; 7], b""];
        assert_eq!(
            split_live(&short).unwrap_err(),
            DecodeError::SequenceLength(7)
        );
        let bad_topic: [&[u8]; 3] = [&[0xff], &[0; 8], b""];
        assert_eq!(
            split_live(&bad_topic).unwrap_err(),
            DecodeError::TopicNotUtf8
        );
    }

    #[test]
    fn replay_answers_in_every_shape() {
        let seq = 7u64.to_be_bytes();
        let batch = ReplayFrame::Batch {
            topic: None,
            seq: 7,
            payload: b"\x93\x00",
        };
        // [seq, payload], with and without the delimiter.
        assert_eq!(parse_replay(&[&seq[..], b"\x93\x00"]).unwrap(), batch);
        assert_eq!(parse_replay(&[&b""[..], &seq, b"\x93\x00"]).unwrap(), batch);
        // [topic, seq, payload], with and without the delimiter.
        let with_topic = ReplayFrame::Batch {
            topic: Some("kv@p@m"),
            seq: 7,
            payload: b"\x93\x00",
        };
        assert_eq!(
            parse_replay(&[&b"kv@p@m"[..], &seq, b"\x93\x00"]).unwrap(),
            with_topic
        );
        assert_eq!(
            parse_replay(&[&b""[..], b"kv@p@m", &seq, b"\x93\x00"]).unwrap(),
            with_topic
        );
        // End markers of both versions.
        assert_eq!(
            parse_replay(&[&b""[..], &END_SEQ, b""]).unwrap(),
            ReplayFrame::End
        );
        assert_eq!(
            parse_replay(&[&END_SEQ[..], b""]).unwrap(),
            ReplayFrame::End
        );
        assert_eq!(
            parse_replay(&[&b""[..], b"", &END_SEQ, b""]).unwrap(),
            ReplayFrame::End
        );
        assert_eq!(
            parse_replay(&[&b"kv@p@m"[..], &END_SEQ, b""]).unwrap(),
            ReplayFrame::End
        );
        // Garbage.
        assert_eq!(
            parse_replay(&[&b"x"[..], b"t", &seq, b""]).unwrap_err(),
            DecodeError::ReplayDelimiter
        );
        assert_eq!(
            parse_replay(&[&b"x"[..]]).unwrap_err(),
            DecodeError::FrameCount(1)
        );
        assert_eq!(
            parse_replay(&[&b"abc"[..], b"\x90"]).unwrap_err(),
            DecodeError::SequenceLength(3)
        );
        assert_eq!(replay_request(258), [0, 0, 0, 0, 0, 0, 1, 2]);
    }
}
