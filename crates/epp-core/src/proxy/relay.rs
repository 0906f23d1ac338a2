//! Relaying the upstream response to the client: frame by frame, unbuffered (SSE included), the
//! client's model name restored where a rewrite happened, and the request's tracker settled with
//! what the client actually got: the status when the body ended, 502 when the upstream broke
//! off mid-body, 499 when the client went away first.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};

use crate::datastore::FailureKind;
use crate::director::RequestTracker;

/// Status counted for a response the upstream broke off mid-body.
pub const STATUS_TRUNCATED: u16 = 502;

/// Streams the upstream body through and completes the request's tracker when it ends (or
/// counts an abort if the client goes away first: the tracker's drop).
pub struct TrackedBody {
    inner: hyper::body::Incoming,
    tracker: Option<RequestTracker>,
    status: u16,
    rewrite: bool,
}

impl TrackedBody {
    pub fn new(inner: hyper::body::Incoming, tracker: RequestTracker, status: u16) -> Self {
        let rewrite = tracker.rewrites_responses();
        let mut tb = Self {
            inner,
            tracker: Some(tracker),
            status,
            rewrite,
        };
        if tb.inner.is_end_stream() {
            if let Some(mut t) = tb.tracker.take() {
                t.first_byte();
                t.finish(status);
            }
        }
        tb
    }

    fn finish(&mut self, status: u16) {
        if let Some(t) = self.tracker.take() {
            t.finish(status);
        }
    }
}

impl HttpBody for TrackedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let frame = match frame.into_data() {
                    Ok(data) => {
                        let data = match this.tracker.as_mut() {
                            Some(t) => {
                                t.first_byte();
                                if this.rewrite {
                                    Bytes::from(t.response_chunk(data.to_vec()))
                                } else {
                                    t.observe_response(&data);
                                    data
                                }
                            }
                            None => data,
                        };
                        Frame::data(data)
                    }
                    Err(other) => other,
                };
                if this.inner.is_end_stream() {
                    this.finish(this.status);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                this.finish(this.status);
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                tracing::debug!(error = %e, "upstream broke off the response body");
                if let Some(t) = &this.tracker {
                    t.upstream_failed(FailureKind::Other);
                }
                this.finish(STATUS_TRUNCATED);
                Poll::Ready(Some(Err(e)))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        if self.rewrite {
            SizeHint::default()
        } else {
            self.inner.size_hint()
        }
    }
}
