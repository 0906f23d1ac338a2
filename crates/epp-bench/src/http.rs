//! The one HTTP client the harness uses (hyper 1 + hyper-util's pooled client), base-URL handling,
//! and small GET helpers for `/v1/models` and `/metrics`.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;

/// Pooled HTTP/1 client with a bounded connect timeout.
pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// Errors talking to a server outside a measured request.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("invalid URL `{url}`: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("GET {url} failed: {source}")]
    Request {
        url: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("GET {url} answered HTTP {status}")]
    Status { url: String, status: u16 },
    #[error("GET {url} timed out")]
    Timeout { url: String },
    #[error("GET {url}: unexpected body: {reason}")]
    Body { url: String, reason: String },
}

/// A client tuned for many concurrent loopback requests.
pub fn client() -> HttpClient {
    let mut conn = HttpConnector::new();
    conn.set_connect_timeout(Some(Duration::from_secs(5)));
    conn.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(1024)
        .build(conn)
}

/// Normalises an OpenAI base URL: `http://host:port`, `http://host:port/` and
/// `http://host:port/v1` all become `http://host:port` (paths are appended as `/v1/...`).
pub fn normalize_base_url(url: &str) -> Result<String, HttpError> {
    let bad = |reason: &str| HttpError::BadUrl {
        url: url.to_owned(),
        reason: reason.to_owned(),
    };
    let trimmed = url.trim().trim_end_matches('/');
    let trimmed = trimmed.strip_suffix("/v1").unwrap_or(trimmed);
    let uri: http::Uri = trimmed
        .parse()
        .map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some(other) => return Err(bad(&format!("scheme `{other}` is not supported, use http"))),
        None => return Err(bad("missing scheme, e.g. http://127.0.0.1:8000")),
    }
    if uri.authority().is_none() {
        return Err(bad("missing host"));
    }
    Ok(trimmed.to_owned())
}

/// GETs `url` and returns the body as text (2xx only).
pub async fn get_text(
    client: &HttpClient,
    url: &str,
    timeout: Duration,
) -> Result<String, HttpError> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e: http::uri::InvalidUri| HttpError::BadUrl {
            url: url.to_owned(),
            reason: e.to_string(),
        })?;
    let fut = async {
        let resp = client.get(uri).await.map_err(|e| HttpError::Request {
            url: url.to_owned(),
            source: Box::new(e),
        })?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| HttpError::Request {
                url: url.to_owned(),
                source: Box::new(e),
            })?
            .to_bytes();
        if !(200..300).contains(&status) {
            return Err(HttpError::Status {
                url: url.to_owned(),
                status,
            });
        }
        Ok(String::from_utf8_lossy(&body).into_owned())
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| HttpError::Timeout {
            url: url.to_owned(),
        })?
}

/// Model ids served at `base_url` (`GET /v1/models`).
pub async fn list_models(client: &HttpClient, base_url: &str) -> Result<Vec<String>, HttpError> {
    let url = format!("{base_url}/v1/models");
    let text = get_text(client, &url, Duration::from_secs(10)).await?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| HttpError::Body {
        url: url.clone(),
        reason: e.to_string(),
    })?;
    let ids = v["data"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|m| m["id"].as_str().map(str::to_owned))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls_are_normalised() {
        for (input, want) in [
            ("http://127.0.0.1:8000", "http://127.0.0.1:8000"),
            ("http://127.0.0.1:8000/", "http://127.0.0.1:8000"),
            ("http://127.0.0.1:8000/v1", "http://127.0.0.1:8000"),
            ("http://127.0.0.1:8000/v1/", "http://127.0.0.1:8000"),
            ("http://gw/prefix", "http://gw/prefix"),
        ] {
            assert_eq!(normalize_base_url(input).unwrap(), want);
        }
        let e = normalize_base_url("https://x").unwrap_err().to_string();
        assert!(e.contains("scheme `https` is not supported"), "{e}");
        assert!(normalize_base_url("127.0.0.1:8000").is_err());
    }
}
