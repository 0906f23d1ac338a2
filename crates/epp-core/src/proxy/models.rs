//! `GET /v1/models` and `GET /v1/models/{id}` answered by the proxy itself: the union of the
//! models the pool's endpoints serve (as the OpenAI API lists them), asked of every routable
//! endpoint at once with a short deadline. A backend that does not answer is left out of the
//! list; this never counts against its health (it is not routed traffic).

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};

use super::UpstreamClient;
use crate::datastore::{HealthState, Snapshot};
use crate::director::RouteError;

/// How long each endpoint gets to list its models.
pub const LIST_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest model list read from one endpoint.
const MAX_LIST_BYTES: usize = 4 * 1024 * 1024;

/// The pool's models, by id (the first endpoint's object for an id wins; ids sorted).
pub async fn pool_models(
    client: &UpstreamClient,
    snapshot: &Snapshot,
) -> Result<BTreeMap<String, Value>, RouteError> {
    let mut addrs: Vec<&str> = snapshot.routable().map(|e| e.endpoint.address()).collect();
    if addrs.is_empty() {
        addrs = snapshot
            .endpoints
            .iter()
            .filter(|e| e.health == HealthState::Stale)
            .map(|e| e.endpoint.address())
            .collect();
    }
    if addrs.is_empty() {
        return Err(RouteError::new(
            503,
            "no healthy endpoint to list the models of",
        ));
    }
    let lists = futures_util::future::join_all(addrs.iter().map(|a| list_one(client, a))).await;
    let mut models = BTreeMap::new();
    let mut answered = 0;
    for (addr, list) in addrs.iter().zip(lists) {
        match list {
            Ok(items) => {
                answered += 1;
                for m in items {
                    if let Some(id) = m.get("id").and_then(Value::as_str) {
                        models.entry(id.to_string()).or_insert(m);
                    }
                }
            }
            Err(e) => tracing::debug!(endpoint = %addr, error = %e, "model list failed"),
        }
    }
    if answered == 0 {
        return Err(RouteError::new(
            502,
            format!(
                "none of the {} endpoints answered GET /v1/models within {LIST_TIMEOUT:?}",
                addrs.len()
            ),
        ));
    }
    Ok(models)
}

/// The `{"object":"list","data":[...]}` body.
pub fn list_body(models: BTreeMap<String, Value>) -> Vec<u8> {
    let data: Vec<Value> = models.into_values().collect();
    serde_json::to_vec(&json!({"object": "list", "data": data})).unwrap_or_default()
}

async fn list_one(client: &UpstreamClient, addr: &str) -> Result<Vec<Value>, String> {
    let uri: http::Uri = format!("http://{addr}/v1/models")
        .parse()
        .map_err(|e| format!("bad address: {e}"))?;
    let req = http::Request::get(uri)
        .header(http::header::ACCEPT, "application/json")
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let fetch = async {
        let resp = client.request(req).await.map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("status {}", resp.status()));
        }
        let body = http_body_util::Limited::new(resp.into_body(), MAX_LIST_BYTES)
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        let v: Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
        match v.get("data") {
            Some(Value::Array(items)) => Ok(items.clone()),
            _ => Err("no `data` array in the answer".to_string()),
        }
    };
    tokio::time::timeout(LIST_TIMEOUT, fetch)
        .await
        .map_err(|_| "timed out".to_string())?
}
