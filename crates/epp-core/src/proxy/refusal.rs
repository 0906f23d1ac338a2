//! JSON bodies for the requests hyper refuses itself. When a request head cannot be parsed
//! (over [`MAX_HEADER_BYTES`](crate::proxy::MAX_HEADER_BYTES), a malformed request line or
//! header, an over-long URI, a TLS hello on the plain port) hyper answers on its own with an
//! empty-bodied 400, 414 or 431 and closes, before the proxy's handler ever sees a request.
//! [`RefusalIo`] sits between hyper and the socket and replaces exactly those answers with the
//! same status and an OpenAI-shaped JSON error body, as every other refusal of the proxy has.
//!
//! How such an answer is told from a response of the proxy's own handler: hyper writes a
//! refusal only while it is reading a request head, i.e. when every request the handler was
//! given ([`Calls`]) already had its response head written. Responses of the handler are
//! counted as their heads go out; a head written with no handler call outstanding, with status
//! 400, 414 or 431 and no body, is hyper's refusal. Anything else passes through untouched.
//! Only HTTP/1 is concerned: over HTTP/2 the `h2` library answers an oversized header block
//! with a bodiless 431 on that stream and the connection stays usable.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::director::error_body;

/// The statuses hyper's HTTP/1 server answers unparsable request heads with.
const REFUSALS: [u16; 3] = [400, 414, 431];

/// Requests one connection handed to the proxy's handler (shared with [`counted`]).
#[derive(Clone, Debug, Default)]
pub struct Calls(Arc<AtomicU64>);

impl Calls {
    fn get(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }
}

/// `service`, counting every request it is given in `calls`.
pub fn counted<S>(service: S, calls: Calls) -> Counted<S> {
    Counted {
        inner: service,
        calls,
    }
}

/// See [`counted`].
#[derive(Clone, Debug)]
pub struct Counted<S> {
    inner: S,
    calls: Calls,
}

impl<S, R> hyper::service::Service<R> for Counted<S>
where
    S: hyper::service::Service<R>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn call(&self, req: R) -> Self::Future {
        self.calls.0.fetch_add(1, Ordering::AcqRel);
        self.inner.call(req)
    }
}

/// The socket as hyper sees it, with its own refusals rewritten (see the module docs).
pub struct RefusalIo<T> {
    io: T,
    calls: Calls,
    /// Final (non-1xx) response heads written so far.
    heads: u64,
    /// The rewritten answer still to be written.
    pending: Vec<u8>,
    sent: usize,
}

impl<T> RefusalIo<T> {
    pub fn new(io: T, calls: Calls) -> Self {
        Self {
            io,
            calls,
            heads: 0,
            pending: Vec::new(),
            sent: 0,
        }
    }

    /// Look at the start of one write: count response heads, and return the replacement when
    /// it is one of hyper's own refusals.
    fn inspect(&mut self, first: &[u8]) -> Option<Vec<u8>> {
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut resp = httparse::Response::new(&mut headers);
        let Ok(httparse::Status::Complete(head_len)) = resp.parse(first) else {
            return None;
        };
        let status = resp.code?;
        if (100..200).contains(&status) {
            return None;
        }
        let outstanding = self.calls.get() > self.heads;
        self.heads += 1;
        if outstanding || !REFUSALS.contains(&status) || first.len() != head_len {
            return None;
        }
        let bodiless = resp
            .headers
            .iter()
            .any(|h| h.name.eq_ignore_ascii_case("content-length") && h.value.trim_ascii() == b"0");
        let typed = resp
            .headers
            .iter()
            .any(|h| h.name.eq_ignore_ascii_case("content-type"));
        if !bodiless || typed {
            return None;
        }
        let body = error_body(status, refusal_message(status), None);
        let mut out = format!(
            "HTTP/1.1 {status} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n",
            resp.reason.unwrap_or(""),
            body.len()
        )
        .into_bytes();
        for h in resp.headers.iter() {
            let skip = ["content-length", "content-type", "connection"]
                .iter()
                .any(|n| h.name.eq_ignore_ascii_case(n));
            if !skip {
                out.extend_from_slice(h.name.as_bytes());
                out.extend_from_slice(b": ");
                out.extend_from_slice(h.value);
                out.extend_from_slice(b"\r\n");
            }
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&body);
        Some(out)
    }

    /// Write what is left of a rewritten answer; `Ready(Ok)` once it is all out.
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>
    where
        T: AsyncWrite + Unpin,
    {
        while self.sent < self.pending.len() {
            let n = std::task::ready!(
                Pin::new(&mut self.io).poll_write(cx, &self.pending[self.sent..])
            )?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.pending = Vec::new();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }
}

/// What the client is told for each refusal.
fn refusal_message(status: u16) -> &'static str {
    match status {
        431 => {
            "the request head is larger than the proxy accepts (64 KiB of request line and headers)"
        }
        414 => "the request URI is longer than the proxy accepts",
        _ => "the request could not be parsed as HTTP/1.1 (malformed request line or header)",
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for RefusalIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for RefusalIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        std::task::ready!(self.drain(cx))?;
        if let Some(out) = self.inspect(buf) {
            self.pending = out;
            // The replacement stands for all of hyper's bytes; it goes out on this call or
            // the next flush.
            let _ = self.drain(cx)?;
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        std::task::ready!(self.drain(cx))?;
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let first = bufs.iter().find(|b| !b.is_empty());
        // A refusal is a lone head; a head followed by more slices carries a body.
        let lone = bufs.iter().filter(|b| !b.is_empty()).count() == 1;
        if let Some(first) = first {
            let replaced = if lone {
                self.inspect(first)
            } else {
                self.count_only(first)
            };
            if let Some(out) = replaced {
                self.pending = out;
                let _ = self.drain(cx)?;
                return Poll::Ready(Ok(total));
            }
        }
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.drain(cx))?;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.drain(cx))?;
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl<T> RefusalIo<T> {
    /// Count a response head that starts a write with a body after it (never a refusal).
    fn count_only(&mut self, first: &[u8]) -> Option<Vec<u8>> {
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut resp = httparse::Response::new(&mut headers);
        if let Ok(httparse::Status::Complete(_)) = resp.parse(first) {
            if resp.code.is_some_and(|c| c >= 200) {
                self.heads += 1;
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const HYPER_431: &[u8] =
        b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: Wed, 02 Dec 2026 05:00:00 GMT\r\n\r\n";

    async fn written(calls: &Calls, writes: &[&[u8]], with_call_before: &[bool]) -> Vec<u8> {
        let (a, mut b) = tokio::io::duplex(64);
        let mut io = RefusalIo::new(a, calls.clone());
        let reader = tokio::spawn(async move {
            let mut out = Vec::new();
            b.read_to_end(&mut out).await.unwrap();
            out
        });
        for (w, call) in writes.iter().zip(with_call_before) {
            if *call {
                calls.0.fetch_add(1, Ordering::AcqRel);
            }
            io.write_all(w).await.unwrap();
        }
        io.shutdown().await.unwrap();
        drop(io);
        reader.await.unwrap()
    }

    fn split(out: &[u8]) -> (String, serde_json::Value) {
        let text = String::from_utf8(out.to_vec()).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        (head.to_string(), serde_json::from_str(body).unwrap())
    }

    #[tokio::test]
    async fn hypers_own_refusal_gets_a_json_body() {
        // The duplex buffer (64 bytes) forces the replacement out over several writes.
        let out = written(&Calls::default(), &[HYPER_431], &[false]).await;
        let (head, body) = split(&out);
        assert!(
            head.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
            "{head}"
        );
        assert!(
            head.contains("\r\ncontent-type: application/json"),
            "{head}"
        );
        assert!(
            head.contains("\r\ndate: Wed, 02 Dec 2026 05:00:00 GMT"),
            "{head}"
        );
        assert!(head.contains("\r\nconnection: close"), "{head}");
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(len, out.len() - head.len() - 4);
        assert_eq!(body["error"]["code"], "request_header_fields_too_large");
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert!(body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("64 KiB"));
    }

    #[tokio::test]
    async fn handler_responses_pass_through_byte_for_byte() {
        let calls = Calls::default();
        // A handler's (or a backend's) bodiless 400 while its request is outstanding.
        let backend_400: &[u8] = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n";
        let ok: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        let out = written(&calls, &[backend_400, ok], &[true, true]).await;
        assert_eq!(out, [backend_400, ok].concat());
        // After both were answered, a refusal on the same connection is rewritten.
        let calls = Calls::default();
        let out = written(&calls, &[ok, HYPER_431], &[true, false]).await;
        assert!(out.starts_with(ok));
        let (head, body) = split(&out[ok.len()..]);
        assert!(head.starts_with("HTTP/1.1 431"));
        assert_eq!(body["error"]["type"], "invalid_request_error");
    }

    #[tokio::test]
    async fn interim_and_other_statuses_are_left_alone() {
        let calls = Calls::default();
        let cont: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";
        let bad: &[u8] = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n";
        // 100 Continue is no answer: the request's final 400 is still the handler's.
        let out = written(&calls, &[cont, bad], &[true, false]).await;
        assert_eq!(out, [cont, bad].concat());
        // A 503 with no body and no call outstanding is not one of hyper's parse refusals.
        let svc_unavail: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n";
        let out = written(&Calls::default(), &[svc_unavail], &[false]).await;
        assert_eq!(out, svc_unavail);
        // Garbage is passed on unchanged.
        let out = written(&Calls::default(), &[b"\x00\x01garbage"], &[false]).await;
        assert_eq!(out, b"\x00\x01garbage");
    }
}
