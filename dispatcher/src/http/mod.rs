//! HTTP/1.x in user space: the slow path's parser (whatever the kernel
//! handed over, framed by the same RFC 9112 rules) and the responses the
//! dispatcher makes itself.

mod local;
mod parse;
mod rules;

pub use local::local_response;
pub use parse::{Event, Head, SlowParser};
