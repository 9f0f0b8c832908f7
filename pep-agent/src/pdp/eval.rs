//! `pep-agent policy eval FILE --input JSON`: one question to the PDP that
//! FILE configures (a policy whose `pdp:` selects the engine, or a `.rego`
//! file evaluated by the embedded engine), the decision printed as JSON.

use std::{path::Path, time::Instant};

use serde_json::{Value, json};

use super::{Pdp, engine};
use crate::policy::{self, LoadContext};

/// The `--input` argument: JSON text, `@FILE`, or `-` for standard input.
pub fn read_input(arg: &str) -> Result<Value, String> {
    let text = if arg == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s).map_err(|e| format!("stdin: {e}"))?;
        s
    } else if let Some(path) = arg.strip_prefix('@') {
        std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?
    } else {
        arg.to_owned()
    };
    serde_json::from_str(&text).map_err(|e| format!("--input is not JSON: {e}"))
}

/// The engine `file` configures.
pub fn engine_for(file: &Path, query: Option<&str>, home: &Path) -> Result<std::sync::Arc<dyn Pdp>, String> {
    if file.extension().is_some_and(|e| e == "rego") {
        return engine::rego_files(&[file.to_path_buf()], query);
    }
    let p = policy::load_file(file, &LoadContext::new(home)).map_err(|e| e.to_string())?;
    engine::build(&p)
}

/// Asks once; returns the printed decision.
pub async fn eval(pdp: &dyn Pdp, input: &Value) -> Result<Value, String> {
    // `{"input": ...}` as OPA takes it is accepted too.
    let input = match input.get("input") {
        Some(inner) if input.as_object().is_some_and(|o| o.len() == 1) => inner,
        _ => input,
    };
    let t = Instant::now();
    let d = pdp.decide(input).await.map_err(|e| e.to_string())?;
    let latency_us = t.elapsed().as_micros() as u64;
    let mut out = json!({
        "allow": d.answer.allow,
        "engine": pdp.engine(),
        "decision_id": d.decision_id,
        "latency_us": latency_us,
    });
    if let Some(t) = d.answer.ttl_s {
        out["ttl_s"] = json!(t);
    }
    if let Some(r) = d.answer.reason {
        out["reason"] = json!(r);
    }
    if let Some(e) = d.answer.error {
        out["error"] = json!(e);
    }
    Ok(out)
}
