//! The engine a policy's `pdp:` section selects.

use std::sync::Arc;

use super::{Pdp, builtin::Builtin, opa::Opa, rego::Rego};
use crate::policy::{DEFAULT_REGO_QUERY, Engine, Policy};

/// Builds `policy.pdp.engine`. Loading Rego parses it: invalid Rego fails
/// here, with its location.
pub fn build(policy: &Policy) -> Result<Arc<dyn Pdp>, String> {
    let cfg = &policy.pdp;
    Ok(match cfg.engine {
        Engine::Builtin => Arc::new(Builtin::new(policy.clone())),
        Engine::Rego => {
            let rego = cfg
                .rego
                .as_ref()
                .ok_or("`engine: rego` needs `rego: { files: [...] }`")?;
            Arc::new(Rego::load(&rego.files, &rego.query).map_err(|e| e.to_string())?)
        }
        Engine::Opa => {
            let opa = cfg
                .opa
                .as_ref()
                .ok_or("`engine: opa` needs `opa: { url: ... }`")?;
            Arc::new(Opa::new(opa).map_err(|e| e.to_string())?)
        }
    })
}

/// A `rego` engine straight from `.rego` files (for `policy eval x.rego`).
pub fn rego_files(files: &[std::path::PathBuf], query: Option<&str>) -> Result<Arc<dyn Pdp>, String> {
    Ok(Arc::new(
        Rego::load(files, query.unwrap_or(DEFAULT_REGO_QUERY)).map_err(|e| e.to_string())?,
    ))
}
