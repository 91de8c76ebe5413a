//! The WebSocket wire format (RFC 6455): frame headers, masking, close codes.
//!
//! Only framing lives here; what a frame means for a connection is in [`crate::connection`].

pub mod close;
pub mod frame;

pub use close::CloseCode;
pub use frame::{FrameHeader, OpCode};
