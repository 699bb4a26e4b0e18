//! FastCGI's record layer (the FastCGI 1.0 specification, §3 and §5), the
//! web server's side: the records a request is sent as, and reading the
//! records of its answer.
//!
//! Written here rather than taken from a crate: the one kept up
//! (`fastcgi-client`) sends the whole request body before it reads any of
//! the answer (a script that writes more than a socket buffer before it
//! reads its upload then deadlocks against it) and takes parameters as
//! UTF-8 strings, where CGI's are bytes.

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

pub const BEGIN_REQUEST: u8 = 1;
pub const END_REQUEST: u8 = 3;
pub const PARAMS: u8 = 4;
pub const STDIN: u8 = 5;
pub const STDOUT: u8 = 6;
pub const STDERR: u8 = 7;

/// The one request id on a connection: one request at a time on each, as
/// nginx does (php-fpm does not multiplex).
pub const REQUEST_ID: u16 = 1;
/// The most content one record carries.
pub const MAX_CONTENT: usize = 0xffff;

const ROLE_RESPONDER: u16 = 1;
const FLAG_KEEP_CONN: u8 = 1;

/// How the app ended a request (`FCGI_END_REQUEST`'s protocolStatus).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    Complete,
    /// It does not take a second request on the connection.
    CantMultiplex,
    /// It is out of capacity (too many requests).
    Overloaded,
    UnknownRole,
    Other(u8),
}

/// One record as read: its type and its content (padding dropped).
#[derive(Debug)]
pub struct Record {
    pub kind: u8,
    pub id: u16,
    pub content: Bytes,
}

fn put_header(buf: &mut BytesMut, kind: u8, len: usize) {
    debug_assert!(len <= MAX_CONTENT);
    buf.put_u8(1);
    buf.put_u8(kind);
    buf.put_u16(REQUEST_ID);
    buf.put_u16(len as u16);
    buf.put_u8(0);
    buf.put_u8(0);
}

/// `FCGI_BEGIN_REQUEST` for a responder; `keep_conn`: the app keeps the
/// connection open for the next request.
pub fn put_begin(buf: &mut BytesMut, keep_conn: bool) {
    put_header(buf, BEGIN_REQUEST, 8);
    buf.put_u16(ROLE_RESPONDER);
    buf.put_u8(if keep_conn { FLAG_KEEP_CONN } else { 0 });
    buf.put_bytes(0, 5);
}

/// `data` as records of stream `kind`, as many as it takes; nothing for
/// empty data (the empty record ends a stream: [`put_end`]).
pub fn put_stream(buf: &mut BytesMut, kind: u8, data: &[u8]) {
    for part in data.chunks(MAX_CONTENT) {
        put_header(buf, kind, part.len());
        buf.put_slice(part);
    }
}

/// The empty record that ends stream `kind`.
pub fn put_end(buf: &mut BytesMut, kind: u8) {
    put_header(buf, kind, 0);
}

/// One name-value pair of the `FCGI_PARAMS` stream (§3.4): each length in
/// one byte below 128, else in four with the top bit set.
pub fn put_pair(buf: &mut BytesMut, name: &[u8], value: &[u8]) {
    for len in [name.len(), value.len()] {
        if len < 128 {
            buf.put_u8(len as u8);
        } else {
            buf.put_u32(len as u32 | 0x8000_0000);
        }
    }
    buf.put_slice(name);
    buf.put_slice(value);
}

/// Reads the next record.
pub async fn read<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Record> {
    let mut h = [0u8; 8];
    r.read_exact(&mut h).await?;
    if h[0] != 1 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("FastCGI record of version {} (not 1)", h[0]),
        ));
    }
    let len = u16::from_be_bytes([h[4], h[5]]) as usize;
    let pad = h[6] as usize;
    let mut content = BytesMut::zeroed(len + pad);
    r.read_exact(&mut content).await?;
    content.truncate(len);
    Ok(Record { kind: h[1], id: u16::from_be_bytes([h[2], h[3]]), content: content.freeze() })
}

/// `FCGI_END_REQUEST`'s content: the app's exit status and how it ended.
pub fn end_request(content: &[u8]) -> std::io::Result<(u32, Ended)> {
    if content.len() < 8 {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "short FCGI_END_REQUEST record"));
    }
    let app = u32::from_be_bytes([content[0], content[1], content[2], content[3]]);
    let how = match content[4] {
        0 => Ended::Complete,
        1 => Ended::CantMultiplex,
        2 => Ended::Overloaded,
        3 => Ended::UnknownRole,
        n => Ended::Other(n),
    };
    Ok((app, how))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn begin_request_is_the_spec_layout() {
        let mut b = BytesMut::new();
        put_begin(&mut b, true);
        assert_eq!(&b[..], &[1, 1, 0, 1, 0, 8, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn pair_lengths_switch_to_four_bytes_at_128() {
        let mut b = BytesMut::new();
        put_pair(&mut b, b"A", &[b'x'; 127]);
        assert_eq!(&b[..2], &[1, 127]);
        let mut b = BytesMut::new();
        put_pair(&mut b, b"A", &[b'x'; 128]);
        assert_eq!(&b[..6], &[1, 0x80, 0, 0, 128, b'A']);
        assert_eq!(b.len(), 6 + 128);
    }

    #[test]
    fn streams_split_into_records_of_at_most_65535() {
        let mut b = BytesMut::new();
        put_stream(&mut b, STDIN, &vec![7u8; 70_000]);
        put_end(&mut b, STDIN);
        assert_eq!(b.len(), 8 + 65_535 + 8 + (70_000 - 65_535) + 8);
        assert_eq!(&b[..8], &[1, STDIN, 0, 1, 0xff, 0xff, 0, 0]);
    }

    #[tokio::test]
    async fn records_read_back_without_their_padding() {
        let mut wire = vec![1, STDOUT, 0, 1, 0, 3, 5, 0];
        wire.extend_from_slice(b"abc\0\0\0\0\0");
        wire.extend_from_slice(&[1, END_REQUEST, 0, 1, 0, 8, 0, 0, 0, 0, 0, 7, 2, 0, 0, 0]);
        let mut r = &wire[..];
        let rec = read(&mut r).await.unwrap();
        assert_eq!((rec.kind, rec.id, &rec.content[..]), (STDOUT, 1, &b"abc"[..]));
        let rec = read(&mut r).await.unwrap();
        assert_eq!(rec.kind, END_REQUEST);
        assert_eq!(end_request(&rec.content).unwrap(), (7, Ended::Overloaded));
        assert!(read(&mut r).await.is_err());
        let mut bad = &[2u8, STDOUT, 0, 1, 0, 0, 0, 0][..];
        assert!(read(&mut bad).await.unwrap_err().to_string().contains("version 2"));
    }
}
