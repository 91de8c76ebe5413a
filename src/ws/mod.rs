//! The WebSocket wire format (RFC 6455): frame headers, masking, close codes, incremental UTF-8
//! validation, and the permessage-deflate extension (RFC 7692).
//!
//! Only framing lives here; what a frame means for a connection is in [`crate::connection`].

pub mod close;
pub mod deflate;
pub mod frame;
pub mod utf8;

pub use close::CloseCode;
pub use frame::{FrameHeader, OpCode};
pub use utf8::{Utf8Error, Utf8Validator};
