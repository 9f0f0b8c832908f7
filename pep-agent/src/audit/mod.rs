//! The audit stream: kernel events decoded into SPEC records, chained, and
//! written to sinks; and the reader side (`events tail`, `events verify`).

pub mod clock;
pub mod compact;
pub mod decode;
pub mod exe;
pub mod hub;
pub mod line;
#[cfg(test)]
mod line_tests;
pub mod ocsf;
pub mod pipeline;
pub mod pump;
pub mod record;
pub mod ring;
pub mod sink;
pub mod tail;
pub mod verify;
