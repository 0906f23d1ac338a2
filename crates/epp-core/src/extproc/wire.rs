//! The Envoy messages the picker sends and reads: header mutations, the `envoy.lb` pick
//! metadata, the subset hint, streamed body pieces, immediate (error) responses, and the
//! "served by" report. Builders only: no state, no policy.

use std::collections::HashMap;

use envoy_types::pb::envoy::config::core::v3::{
    HeaderMap, HeaderValue, HeaderValueOption, Metadata,
};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    body_mutation, processing_response, BodyMutation, BodyResponse, CommonResponse, HeaderMutation,
    HeadersResponse, ImmediateResponse, ProcessingResponse, StreamedBodyResponse, TrailersResponse,
};
use envoy_types::pb::google::protobuf::{value::Kind, ListValue, Struct, Value};

use super::{EXT_PROC_ATTRIBUTES, UPSTREAM_ADDRESS_ATTRIBUTE};
use crate::director::RouteError;
use crate::gateway::headers::{DESTINATION, LB_NAMESPACE, SERVED, SUBSET, SUBSET_NAMESPACE};

/// Largest body piece sent back in one `streamed_response` (the reference's value).
pub const BODY_PIECE_BYTES: usize = 62_000;

/// Which half of the HTTP exchange an answer belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Request,
    Response,
}

/// The served endpoint the gateway reports: `envoy.lb` metadata (the protocol), else the
/// `upstream.address` attribute (what the shipped Envoy config asks for).
pub(super) fn served_endpoint(
    md: Option<&Metadata>,
    attributes: &HashMap<String, Struct>,
) -> Option<String> {
    let from_md = md
        .and_then(|m| m.filter_metadata.get(LB_NAMESPACE))
        .and_then(|s| s.fields.get(SERVED))
        .and_then(|v| match &v.kind {
            Some(Kind::StringValue(s)) if !s.is_empty() => Some(s.clone()),
            _ => None,
        });
    from_md.or_else(|| {
        attributes
            .get(EXT_PROC_ATTRIBUTES)
            .and_then(|s| s.fields.get(UPSTREAM_ADDRESS_ATTRIBUTE))
            .and_then(|v| match &v.kind {
                Some(Kind::StringValue(s)) if !s.is_empty() => Some(s.clone()),
                _ => None,
            })
    })
}

/// Inbound headers as (name, value) pairs; Envoy sends `raw_value` (older ones `value`).
pub(super) fn header_pairs(map: Option<&HeaderMap>) -> Vec<(String, Vec<u8>)> {
    map.map(|m| {
        m.headers
            .iter()
            .map(|h| {
                let v = if h.raw_value.is_empty() {
                    h.value.as_bytes().to_vec()
                } else {
                    h.raw_value.clone()
                };
                (h.key.clone(), v)
            })
            .collect()
    })
    .unwrap_or_default()
}

/// A `set` header mutation (raw value bytes).
pub fn header_option(key: &str, value: &[u8]) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_string(),
            value: String::new(),
            raw_value: value.to_vec(),
        }),
        ..Default::default()
    }
}

/// A header set over whatever the client sent under that name (Envoy's default would append).
pub fn header_overwrite(key: &str, value: &[u8]) -> HeaderValueOption {
    HeaderValueOption {
        append_action:
            envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction::OverwriteIfExistsOrAdd
                as i32,
        ..header_option(key, value)
    }
}

fn string_value(s: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.to_string())),
    }
}

/// `{"envoy.lb": {"x-gateway-destination-endpoint": value}}`.
pub fn destination_metadata(value: &str, scores: &[(String, f64)]) -> Struct {
    let mut inner = Struct {
        fields: HashMap::from([(DESTINATION.to_string(), string_value(value))]),
    };
    if !scores.is_empty() {
        let fields = scores
            .iter()
            .map(|(addr, s)| {
                (
                    addr.clone(),
                    Value {
                        kind: Some(Kind::NumberValue(*s)),
                    },
                )
            })
            .collect();
        inner.fields.insert(
            crate::gateway::headers::DESTINATION_SCORES.to_string(),
            Value {
                kind: Some(Kind::StructValue(Struct { fields })),
            },
        );
    }
    Struct {
        fields: HashMap::from([(
            LB_NAMESPACE.to_string(),
            Value {
                kind: Some(Kind::StructValue(inner)),
            },
        )]),
    }
}

/// `filter_metadata` carrying a subset hint (for clients and tests).
pub fn subset_metadata(endpoints: &[&str]) -> Metadata {
    let list = Value {
        kind: Some(Kind::ListValue(ListValue {
            values: endpoints.iter().map(|e| string_value(e)).collect(),
        })),
    };
    Metadata {
        filter_metadata: HashMap::from([(
            SUBSET_NAMESPACE.to_string(),
            Struct {
                fields: HashMap::from([(SUBSET.to_string(), list)]),
            },
        )]),
        ..Default::default()
    }
}

pub(super) fn immediate(err: &RouteError) -> ProcessingResponse {
    ProcessingResponse {
        response: Some(processing_response::Response::ImmediateResponse(
            ImmediateResponse {
                status: Some(HttpStatus {
                    code: i32::from(err.status),
                }),
                headers: Some(HeaderMutation {
                    set_headers: std::iter::once(header_option(
                        "content-type",
                        b"application/json",
                    ))
                    .chain(err.dropped_reason.map(|r| {
                        header_option(
                            crate::gateway::headers::REQUEST_DROPPED_REASON,
                            r.as_bytes(),
                        )
                    }))
                    .collect(),
                    remove_headers: Vec::new(),
                }),
                body: err.json_body(),
                grpc_status: None,
                details: format!("epp: {}", err.message),
            },
        )),
        ..Default::default()
    }
}

/// The request-headers answer that carries a pick: `set` (the destination header first), the
/// `envoy.lb` metadata with `metadata_value`, and `clear_route_cache` so Envoy re-routes on it.
pub fn routed_headers_response(
    set: Vec<HeaderValueOption>,
    remove: Vec<String>,
    metadata_value: &str,
    scores: &[(String, f64)],
) -> ProcessingResponse {
    ProcessingResponse {
        response: Some(processing_response::Response::RequestHeaders(
            HeadersResponse {
                response: Some(CommonResponse {
                    header_mutation: Some(HeaderMutation {
                        set_headers: set,
                        remove_headers: remove,
                    }),
                    clear_route_cache: true,
                    ..Default::default()
                }),
            },
        )),
        dynamic_metadata: Some(destination_metadata(metadata_value, scores)),
        ..Default::default()
    }
}

/// A `streamed_response` body answer carrying `chunk`.
pub fn body_response(chunk: Vec<u8>, end_of_stream: bool, dir: Direction) -> ProcessingResponse {
    let br = BodyResponse {
        response: Some(CommonResponse {
            body_mutation: Some(BodyMutation {
                mutation: Some(body_mutation::Mutation::StreamedResponse(
                    StreamedBodyResponse {
                        body: chunk,
                        end_of_stream,
                        ..Default::default()
                    },
                )),
            }),
            ..Default::default()
        }),
    };
    ProcessingResponse {
        response: Some(match dir {
            Direction::Request => processing_response::Response::RequestBody(br),
            Direction::Response => processing_response::Response::ResponseBody(br),
        }),
        ..Default::default()
    }
}

/// An empty trailers answer.
pub fn trailers_response(dir: Direction) -> ProcessingResponse {
    let t = TrailersResponse::default();
    ProcessingResponse {
        response: Some(match dir {
            Direction::Request => processing_response::Response::RequestTrailers(t),
            Direction::Response => processing_response::Response::ResponseTrailers(t),
        }),
        ..Default::default()
    }
}

/// Split a body into pieces of at most [`BODY_PIECE_BYTES`]; end_of_stream (if `eos`) only on
/// the last. An empty body still gives one piece.
pub(super) fn push_body_pieces(
    out: &mut Vec<ProcessingResponse>,
    body: Vec<u8>,
    eos: bool,
    dir: Direction,
) {
    if body.len() <= BODY_PIECE_BYTES {
        out.push(body_response(body, eos, dir));
        return;
    }
    let n = body.len().div_ceil(BODY_PIECE_BYTES);
    for (i, piece) in body.chunks(BODY_PIECE_BYTES).enumerate() {
        out.push(body_response(piece.to_vec(), eos && i + 1 == n, dir));
    }
}

/// Number of pieces a body of `len` bytes is re-sent in.
pub fn piece_count(len: usize) -> usize {
    len.div_ceil(BODY_PIECE_BYTES).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces() {
        for (len, n) in [
            (0, 1),
            (61_000, 1),
            (62_000, 1),
            (62_001, 2),
            (63_000, 2),
            (125_000, 3),
        ] {
            let mut out = Vec::new();
            push_body_pieces(&mut out, vec![b'x'; len], true, Direction::Request);
            assert_eq!(out.len(), n, "len {len}");
            assert_eq!(piece_count(len), n);
            let eos: Vec<bool> = out
                .iter()
                .map(|r| match &r.response {
                    Some(processing_response::Response::RequestBody(b)) => {
                        match &b
                            .response
                            .as_ref()
                            .unwrap()
                            .body_mutation
                            .as_ref()
                            .unwrap()
                            .mutation
                        {
                            Some(body_mutation::Mutation::StreamedResponse(s)) => s.end_of_stream,
                            _ => panic!(),
                        }
                    }
                    _ => panic!(),
                })
                .collect();
            assert!(eos[..n - 1].iter().all(|e| !e) && eos[n - 1]);
        }
    }
}
