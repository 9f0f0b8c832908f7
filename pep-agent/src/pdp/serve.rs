//! `pep-agent pdp serve --policy FILE.rego --listen ADDR`: an Open Policy
//! Agent compatible Data API backed by the embedded Rego engine.
//!
//! - `POST /v1/data/{path}` with `{"input": ...}`: `{"result": ...,
//!   "decision_id": ...}`, or `{}` when the document is undefined (as OPA);
//! - `GET /health`: `{}` once the policy is loaded;
//! - `GET /metrics`: `pep_pdp_requests_total N`, the number of data
//!   requests answered so far; every response also carries it in the
//!   `x-pep-requests` header, so a client can tell whether it was asked.

use std::{
    convert::Infallible,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{
    Method, Request, Response, StatusCode, body::Incoming, server::conn::http1, service::service_fn,
};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

use super::{new_decision_id, rego};

struct State {
    engine: Mutex<regorus::Engine>,
    requests: AtomicU64,
}

/// Loads `files` and serves on `listen` until the process is stopped.
/// Prints `listening on http://ADDR` on stderr once bound.
pub async fn serve(files: &[PathBuf], listen: &str) -> anyhow::Result<()> {
    let engine = rego::load_engine(files)?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("--listen {listen}: {e}"))?;
    eprintln!("pep-agent pdp: listening on http://{}", listener.local_addr()?);
    let state = Arc::new(State {
        engine: Mutex::new(engine),
        requests: AtomicU64::new(0),
    });
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // Out of fds and the like: keep serving the connections we have.
                tracing::warn!("accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let st = state.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(st.clone(), req));
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                tracing::debug!("connection: {e}");
            }
        });
    }
}

fn reply(status: StatusCode, body: &Value, requests: u64) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("x-pep-requests", requests.to_string())
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("static response parts are valid")
}

async fn handle(st: Arc<State>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_owned();
    let seen = || st.requests.load(Ordering::SeqCst);
    match (req.method(), path.as_str()) {
        (&Method::GET, "/health") => Ok(reply(StatusCode::OK, &json!({}), seen())),
        (&Method::GET, "/metrics") => Ok(Response::builder()
            .header("content-type", "text/plain; version=0.0.4")
            .header("x-pep-requests", seen().to_string())
            .body(Full::new(Bytes::from(format!(
                "pep_pdp_requests_total {}\n",
                seen()
            ))))
            .expect("static response parts are valid")),
        (&Method::POST, p) if p == "/v1/data" || p.starts_with("/v1/data/") => {
            let n = st.requests.fetch_add(1, Ordering::SeqCst) + 1;
            let body = match req.into_body().collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => {
                    return Ok(reply(
                        StatusCode::BAD_REQUEST,
                        &error("invalid_parameter", &e.to_string()),
                        n,
                    ));
                }
            };
            let input = if body.iter().all(u8::is_ascii_whitespace) {
                Value::Null
            } else {
                match serde_json::from_slice::<Value>(&body) {
                    Ok(v) => v.get("input").cloned().unwrap_or(Value::Null),
                    Err(e) => {
                        return Ok(reply(
                            StatusCode::BAD_REQUEST,
                            &error("invalid_parameter", &format!("body is not JSON: {e}")),
                            n,
                        ));
                    }
                }
            };
            let rel = p.trim_start_matches("/v1/data").trim_matches('/');
            let query = if rel.is_empty() {
                "data".to_owned()
            } else {
                format!("data.{}", rel.replace('/', "."))
            };
            let result = {
                let mut engine = st.engine.lock().unwrap_or_else(|e| e.into_inner());
                rego::eval_in(&mut engine, &query, &input)
            };
            Ok(match result {
                Ok(Some(v)) => reply(
                    StatusCode::OK,
                    &json!({"result": v, "decision_id": new_decision_id()}),
                    n,
                ),
                Ok(None) => reply(StatusCode::OK, &json!({}), n),
                Err(e) => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &error("internal_error", &e.0),
                    n,
                ),
            })
        }
        _ => Ok(reply(
            StatusCode::NOT_FOUND,
            &error("resource_not_found", &path),
            seen(),
        )),
    }
}

/// OPA's error body.
fn error(code: &str, message: &str) -> Value {
    json!({"code": code, "message": message})
}
