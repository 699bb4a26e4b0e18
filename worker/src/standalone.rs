//! The standalone server: HTTP/1.1 on a TCP port of its own, without the
//! dispatcher: the "no dispatch" baseline the benchmarks compare against,
//! running the same handler code as a pooled worker. (Not to be confused
//! with direct responses, which are a pooled worker writing into a client
//! socket the dispatcher leased it.)

use std::{future::Future, net::SocketAddr, sync::Arc};

use bytes::BytesMut;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use crate::{pull::reassembly::Raw, Request, Response};

/// Largest head accepted (431 above).
const MAX_HEAD: usize = 16 * 1024;

/// Serves `handler` on `addr` until the process ends.
pub async fn serve<H, F>(addr: SocketAddr, handler: H) -> std::io::Result<()>
where
    H: Fn(Request) -> F + Send + Sync + 'static,
    F: Future<Output = Response> + Send,
{
    let listener = TcpListener::bind(addr).await?;
    let handler = Arc::new(handler);
    loop {
        let (s, _) = listener.accept().await?;
        let _ = s.set_nodelay(true);
        let h = handler.clone();
        tokio::spawn(async move {
            let _ = connection(s, &*h).await;
        });
    }
}

async fn connection<H, F>(mut s: TcpStream, handler: &H) -> std::io::Result<()>
where
    H: Fn(Request) -> F,
    F: Future<Output = Response>,
{
    let mut buf = BytesMut::with_capacity(8192);
    let mut seq = 0u32;
    loop {
        // Head.
        let (head_len, cl, close) = loop {
            let mut headers = [httparse::EMPTY_HEADER; crate::request::MAX_HEADERS];
            let mut req = httparse::Request::new(&mut headers);
            match req.parse(&buf) {
                Ok(httparse::Status::Complete(n)) => {
                    let cl = req
                        .headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                        .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse::<usize>().ok())
                        .unwrap_or(0);
                    let conn = req
                        .headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case("connection"))
                        .map(|h| h.value.to_ascii_lowercase());
                    let close = match req.version {
                        Some(0) => conn.as_deref() != Some(b"keep-alive"),
                        _ => conn.as_deref() == Some(b"close"),
                    };
                    break (n, cl, close);
                }
                Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
                _ => {
                    s.write_all(&Response::text(400, "bad request\n").serialize(false, true)).await?;
                    return Ok(());
                }
            }
            if s.read_buf(&mut buf).await? == 0 {
                return Ok(());
            }
        };
        while buf.len() < head_len + cl {
            if s.read_buf(&mut buf).await? == 0 {
                return Ok(());
            }
        }
        let head = buf.split_to(head_len).freeze();
        let body = buf.split_to(cl).freeze();
        let raw = Raw {
            conn: 0,
            seq,
            head,
            body,
            close,
            from_kernel: false,
            peer: s.peer_addr().ok(),
            upgrade: false,
            splice: false,
        };
        seq = seq.wrapping_add(1);
        let Ok(req) = Request::parse(raw) else { return Ok(()) };
        let head_only = req.method == "HEAD";
        let resp = handler(req).await;
        let close = close || resp.close;
        s.write_all(&resp.serialize(head_only, close)).await?;
        if close {
            return Ok(());
        }
    }
}
