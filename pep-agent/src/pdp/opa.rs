//! The `opa` engine: a remote Open Policy Agent over its Data API.
//!
//! One `reqwest::Client` per engine keeps connections alive between
//! queries (no TCP or TLS handshake per decision). `timeout_ms` bounds the
//! whole decision, retries included: an attempt that fails fast (connection
//! refused or reset, a 5xx) is retried, at most `MAX_ATTEMPTS` in all, while
//! the deadline allows. The answer's `decision_id` is kept for the record.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{DecideFuture, Pdp, PdpDecision, PdpError, answer::parse_response};
use crate::policy::OpaConfig;

/// Attempts per decision, the first included.
pub const MAX_ATTEMPTS: u32 = 3;
/// Pause between attempts.
const RETRY_PAUSE: Duration = Duration::from_millis(5);

pub struct Opa {
    client: reqwest::Client,
    url: String,
    timeout: Duration,
}

impl Opa {
    pub fn new(cfg: &OpaConfig) -> Result<Self, PdpError> {
        Self::with_url(&cfg.url, Duration::from_millis(cfg.timeout_ms))
    }

    pub fn with_url(url: &str, timeout: Duration) -> Result<Self, PdpError> {
        let client = reqwest::Client::builder()
            // The PDP's URL is explicit: never route decisions through an
            // ambient HTTP proxy.
            .no_proxy()
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(90))
            .connect_timeout(timeout)
            .build()
            .map_err(|e| PdpError::Unavailable(format!("HTTP client: {e}")))?;
        Ok(Self {
            client,
            url: url.to_owned(),
            timeout,
        })
    }

    /// POSTs `{"input": input}` to `url`, within the deadline, and returns
    /// the response body.
    pub async fn post(&self, url: &str, input: &Value) -> Result<Value, PdpError> {
        let deadline = Instant::now() + self.timeout;
        let body = json!({ "input": input });
        let mut last = String::new();
        for attempt in 1..=MAX_ATTEMPTS {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let send = self.client.post(url).json(&body).timeout(left).send();
            match send.await {
                Ok(resp) if resp.status().is_success() => {
                    return match tokio::time::timeout(
                        deadline.saturating_duration_since(Instant::now()),
                        resp.json::<Value>(),
                    )
                    .await
                    {
                        Ok(Ok(v)) => Ok(v),
                        Ok(Err(e)) if e.is_timeout() => Err(PdpError::Timeout(self.timeout)),
                        // Not JSON: a shape problem, answered as deny by the caller.
                        Ok(Err(e)) => Ok(json!({"pep_error": format!("response is not JSON: {e}")})),
                        Err(_) => Err(PdpError::Timeout(self.timeout)),
                    };
                }
                Ok(resp) if resp.status().is_server_error() => {
                    last = format!("HTTP {} from {url}", resp.status());
                }
                Ok(resp) => {
                    // 4xx: asking again will not help.
                    let status = resp.status();
                    let text = resp.text().await.unwrap_or_default();
                    return Err(PdpError::Unavailable(format!(
                        "HTTP {status} from {url}: {}",
                        text.chars().take(200).collect::<String>()
                    )));
                }
                Err(e) if e.is_timeout() => return Err(PdpError::Timeout(self.timeout)),
                Err(e) => last = format!("{url}: {e}"),
            }
            if attempt < MAX_ATTEMPTS {
                tokio::time::sleep(RETRY_PAUSE.min(deadline.saturating_duration_since(Instant::now()))).await;
            }
        }
        if last.is_empty() {
            Err(PdpError::Timeout(self.timeout))
        } else {
            Err(PdpError::Unavailable(last))
        }
    }

    /// The Data API URL of another document on the same server, e.g.
    /// `data.pep.rules` next to the decision's URL.
    pub fn sibling_url(&self, query: &str) -> String {
        let base = match self.url.find("/v1/data") {
            Some(i) => &self.url[..i],
            None => self.url.trim_end_matches('/'),
        };
        let path = query.strip_prefix("data.").unwrap_or(query).replace('.', "/");
        format!("{base}/v1/data/{path}")
    }
}

impl Pdp for Opa {
    fn engine(&self) -> &'static str {
        "opa"
    }

    fn decide<'a>(&'a self, input: &'a Value) -> DecideFuture<'a> {
        Box::pin(async move {
            let body = self.post(&self.url, input).await?;
            let (mut answer, decision_id) = parse_response(&body);
            if let Some(e) = body.get("pep_error").and_then(Value::as_str) {
                answer.error = Some(format!("{e}: deny"));
            }
            Ok(PdpDecision { answer, decision_id })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sibling_urls() {
        let o = Opa::with_url(
            "http://127.0.0.1:8181/v1/data/pep/decision",
            Duration::from_millis(5),
        )
        .unwrap();
        assert_eq!(
            o.sibling_url("data.pep.rules"),
            "http://127.0.0.1:8181/v1/data/pep/rules"
        );
    }

    #[tokio::test]
    async fn refused_is_unavailable_and_bounded() {
        // A port nobody listens on: bind one, then free it.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        let o = Opa::with_url(
            &format!("http://127.0.0.1:{port}/v1/data/pep/decision"),
            Duration::from_millis(300),
        )
        .unwrap();
        let t = Instant::now();
        let err = o.decide(&json!({})).await.expect_err("must fail");
        assert!(
            matches!(err, PdpError::Unavailable(_) | PdpError::Timeout(_)),
            "{err}"
        );
        assert!(t.elapsed() < Duration::from_millis(600), "{:?}", t.elapsed());
    }
}
