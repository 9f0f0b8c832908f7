//! `vars:` and the expansion of `${var}` and `~` in policy values.
//!
//! Expansion happens while the value's node is being deserialized, so an
//! unknown variable is reported at that node. The values it needs (the vars
//! and the sandbox user's home) reach the visitors through a thread-local set
//! by `load_str` for the duration of the parse: serde offers no other way to
//! hand context to a derived `Deserialize` deep in the tree short of writing a
//! `DeserializeSeed` for every type on the way down.

use std::cell::RefCell;
use std::collections::HashSet;
use std::fmt;
use std::path::PathBuf;

use serde::de::{self, DeserializeSeed, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

/// The `vars:` mapping, in file order. Each value has had earlier vars
/// expanded into it (`${a}` may be used by vars defined after `a`); `~` is
/// kept, to be expanded where the var is used as a path.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Vars(Vec<(String, String)>);

impl Vars {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<'de> Deserialize<'de> for Vars {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(VarsVisitor)
    }
}

struct VarsVisitor;

impl<'de> Visitor<'de> for VarsVisitor {
    type Value = Vars;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping of variable names to strings")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Vars, A::Error> {
        let mut vars = Vars::default();
        let mut names = HashSet::new();
        while let Some(name) = map.next_key_seed(VarName { seen: &names })? {
            let value = map.next_value_seed(VarValue { earlier: &vars })?;
            names.insert(name.clone());
            vars.0.push((name, value));
        }
        Ok(vars)
    }
}

/// A var's name; rejects bad and duplicate names at the key.
struct VarName<'a> {
    seen: &'a HashSet<String>,
}

impl<'de> DeserializeSeed<'de> for VarName<'_> {
    type Value = String;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<String, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for VarName<'_> {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a variable name")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
        check_var_name(v).map_err(E::custom)?;
        if self.seen.contains(v) {
            return Err(E::custom(format!("variable `{v}` is defined twice")));
        }
        Ok(v.to_owned())
    }
}

/// A var's value, with the vars defined before it expanded.
struct VarValue<'a> {
    earlier: &'a Vars,
}

impl<'de> DeserializeSeed<'de> for VarValue<'_> {
    type Value = String;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<String, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for VarValue<'_> {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
        expand_vars_with(v, self.earlier).map_err(E::custom)
    }
}

/// Var names: a letter or `_`, then letters, digits, `_` or `-`.
fn check_var_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "bad variable name `{name}`: use letters, digits, `_` and `-`, starting with a letter or `_`"
        ))
    }
}

/// Replaces each `${name}` in `text` with the var's value. A `$` not followed
/// by `{` is kept as is.
fn expand_vars_with(text: &str, vars: &Vars) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            return Err(format!("unterminated `${{` in `{text}`"));
        };
        let name = &after[..end];
        check_var_name(name)?;
        match vars.get(name) {
            Some(value) => out.push_str(value),
            None => {
                return Err(format!("unknown variable `${{{name}}}`: define it under `vars:`"));
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// What expansion needs, set for the duration of one parse.
#[derive(Debug, Default)]
pub(crate) struct ExpandContext {
    pub vars: Vars,
    /// The sandbox user's home; `None` makes `~` an error.
    pub home: Option<PathBuf>,
}

thread_local! {
    static CONTEXT: RefCell<ExpandContext> = RefCell::new(ExpandContext::default());
}

/// Runs `f` with `ctx` as the expansion context, restoring the previous one
/// afterwards (also if `f` panics).
pub(crate) fn with_context<R>(ctx: ExpandContext, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<ExpandContext>);
    impl Drop for Restore {
        fn drop(&mut self) {
            if let Some(prev) = self.0.take() {
                CONTEXT.with(|c| *c.borrow_mut() = prev);
            }
        }
    }
    let prev = CONTEXT.with(|c| c.replace(ctx));
    let _restore = Restore(Some(prev));
    f()
}

/// Expands `${var}` in a non-path value (a CIDR, a domain, a URL).
pub(crate) fn expand_vars(text: &str) -> Result<String, String> {
    CONTEXT.with(|c| expand_vars_with(text, &c.borrow().vars))
}

/// Expands `${var}`, then a leading `~` to the sandbox user's home.
pub(crate) fn expand_path(text: &str) -> Result<String, String> {
    let text = expand_vars(text)?;
    let Some(rest) = text.strip_prefix('~') else {
        return Ok(text);
    };
    if !(rest.is_empty() || rest.starts_with('/')) {
        return Err(format!(
            "`{text}`: only `~` and `~/...` (the sandbox user's home) are supported, not `~user`"
        ));
    }
    CONTEXT.with(|c| match &c.borrow().home {
        None => Err(format!(
            "`{text}`: `~` cannot be expanded: the sandbox user's home is not known"
        )),
        Some(home) => match home.to_str() {
            Some(home) => Ok(format!("{home}{rest}")),
            None => Err(format!(
                "`{text}`: the sandbox user's home `{}` is not valid UTF-8",
                home.display()
            )),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vars {
        Vars(
            pairs
                .iter()
                .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
                .collect(),
        )
    }

    #[test]
    fn expands_vars() {
        let v = vars(&[("ws", "/w"), ("x", "y")]);
        assert_eq!(expand_vars_with("${ws}/a/${x}", &v).unwrap(), "/w/a/y");
        assert_eq!(expand_vars_with("$ws/${ws}$", &v).unwrap(), "$ws//w$");
        assert!(
            expand_vars_with("${nope}", &v)
                .unwrap_err()
                .contains("unknown variable `${nope}`")
        );
        assert!(expand_vars_with("${ws", &v).unwrap_err().contains("unterminated"));
        assert!(
            expand_vars_with("${a b}", &v)
                .unwrap_err()
                .contains("bad variable name")
        );
    }

    #[test]
    fn expands_tilde_from_context() {
        let ctx = ExpandContext {
            vars: vars(&[("h", "~/p")]),
            home: Some(PathBuf::from("/home/u")),
        };
        with_context(ctx, || {
            assert_eq!(expand_path("~").unwrap(), "/home/u");
            assert_eq!(expand_path("~/.ssh/**").unwrap(), "/home/u/.ssh/**");
            assert_eq!(expand_path("${h}/x").unwrap(), "/home/u/p/x");
            assert_eq!(expand_path("/a/~/b").unwrap(), "/a/~/b");
            assert!(expand_path("~root/x").unwrap_err().contains("~user"));
        });
        // Restored afterwards: no home, so `~` fails.
        assert!(expand_path("~/x").unwrap_err().contains("not known"));
    }
}
