//! Deserialization helpers that validate *inside* serde's visitors.
//!
//! serde_yaml attaches a position to an error only while the node that raised
//! it is being visited; an error returned after `Deserialize::deserialize` has
//! come back would be reported at the enclosing mapping instead. So scalars are
//! parsed in `visit_str` and whole-mapping checks run at the end of `visit_map`.

use std::fmt;
use std::marker::PhantomData;

use serde::Deserialize;
use serde::de::{self, MapAccess, Visitor, value::MapAccessDeserializer};

/// Deserializes a scalar as text and parses it with `parse`; an `Err` is
/// reported at the scalar.
pub(crate) fn scalar<'de, D, T, F>(d: D, expecting: &'static str, parse: F) -> Result<T, D::Error>
where
    D: de::Deserializer<'de>,
    F: FnOnce(&str) -> Result<T, String>,
{
    d.deserialize_str(ScalarVisitor { expecting, parse })
}

struct ScalarVisitor<F> {
    expecting: &'static str,
    parse: F,
}

impl<'de, T, F> Visitor<'de> for ScalarVisitor<F>
where
    F: FnOnce(&str) -> Result<T, String>,
{
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expecting)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        (self.parse)(v).map_err(E::custom)
    }
}

/// Deserializes a mapping into `Raw` (a derived struct with
/// `deny_unknown_fields`), then turns it into the checked type with `check`;
/// an `Err` from `check` is reported at the mapping.
pub(crate) fn checked_map<'de, D, Raw, T, F>(d: D, expecting: &'static str, check: F) -> Result<T, D::Error>
where
    D: de::Deserializer<'de>,
    Raw: Deserialize<'de>,
    F: FnOnce(Raw) -> Result<T, String>,
{
    d.deserialize_map(MapVisitor {
        expecting,
        check,
        raw: PhantomData,
    })
}

struct MapVisitor<Raw, F> {
    expecting: &'static str,
    check: F,
    raw: PhantomData<Raw>,
}

impl<'de, Raw, T, F> Visitor<'de> for MapVisitor<Raw, F>
where
    Raw: Deserialize<'de>,
    F: FnOnce(Raw) -> Result<T, String>,
{
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expecting)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
        let raw = Raw::deserialize(MapAccessDeserializer::new(map))?;
        (self.check)(raw).map_err(de::Error::custom)
    }
}
