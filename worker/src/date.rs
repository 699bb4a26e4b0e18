//! The `Date` header's value. RFC 9110 §6.6.1: an origin server with a
//! clock sends one on every response (except 1xx and 5xx it may omit; it
//! is sent on those too). Formatted once per second per thread, so a
//! response costs a clock read and a 29-byte copy.

use std::{cell::Cell, time::SystemTime};

/// Length of an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`).
pub const HTTP_DATE_LEN: usize = 29;

thread_local! {
    /// The second last formatted, and its text.
    static CACHE: Cell<(u64, [u8; HTTP_DATE_LEN])> = const { Cell::new((u64::MAX, [0; HTTP_DATE_LEN])) };
}

/// Now as an HTTP date (IMF-fixdate, GMT).
pub fn http_date() -> [u8; HTTP_DATE_LEN] {
    let now = SystemTime::now();
    let secs = now.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    CACHE.with(|c| {
        let (at, text) = c.get();
        if at == secs {
            return text;
        }
        let mut fresh = [0u8; HTTP_DATE_LEN];
        let formatted = httpdate::fmt_http_date(now);
        // Always 29 bytes for the years a system clock gives; a shorter
        // one (impossible in practice) is padded, never cut mid-field.
        let n = formatted.len().min(HTTP_DATE_LEN);
        fresh[..n].copy_from_slice(&formatted.as_bytes()[..n]);
        c.set((secs, fresh));
        fresh
    })
}

/// Appends `Date: <now>\r\n`.
pub fn push_date_header(out: &mut Vec<u8>) {
    out.extend_from_slice(b"Date: ");
    out.extend_from_slice(&http_date());
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_an_imf_fixdate_of_now() {
        let d = http_date();
        let text = std::str::from_utf8(&d).unwrap();
        assert!(text.ends_with(" GMT"), "{text}");
        let parsed = httpdate::parse_http_date(text).unwrap();
        let off = SystemTime::now().duration_since(parsed).unwrap_or_default();
        assert!(off.as_secs() <= 1, "{text} is {off:?} from now");
    }
}
