//! Close codes fanout sends, and the check on codes a client sends (RFC 6455 section 7.4).

/// Why the server closes a connection; the numeric code goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseCode {
    /// 1000: the client asked to close; we echo.
    Normal,
    /// 1001: the server is shutting down, or the client was idle too long.
    Away,
    /// 1002: the client broke the WebSocket protocol.
    Protocol,
    /// 1007: a text message that is not valid UTF-8.
    InvalidPayload,
    /// 1008: a policy was violated (slow consumer, rate limit).
    Policy,
    /// 1009: a message over `--max-message`.
    TooBig,
    /// 4001: the connection's token expired and no newer one came (`refresh`).
    TokenExpired,
    /// 4002: the application's backend asked the server API to disconnect the token's user.
    Disconnected,
    /// 4003: raw mode asked for what its token's rules refuse.
    Forbidden,
    /// Any other valid code, echoed back to a client that sent it.
    Other(u16),
}

impl CloseCode {
    pub fn code(self) -> u16 {
        match self {
            CloseCode::Normal => 1000,
            CloseCode::Away => 1001,
            CloseCode::Protocol => 1002,
            CloseCode::InvalidPayload => 1007,
            CloseCode::Policy => 1008,
            CloseCode::TooBig => 1009,
            CloseCode::TokenExpired => 4001,
            CloseCode::Disconnected => 4002,
            CloseCode::Forbidden => 4003,
            CloseCode::Other(c) => c,
        }
    }

    /// Whether a client may send this code in a close frame (1005, 1006 and 1015 are never sent on
    /// the wire; 1004 and 1016-2999 are reserved; 3000-4999 belong to applications).
    pub fn is_valid_on_wire(code: u16) -> bool {
        matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
    }
}
