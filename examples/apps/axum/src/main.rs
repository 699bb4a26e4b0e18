//! A small axum app, as you would write it for any server, put in a
//! dispatcher pool with one line: `worker::serve(app)`.
//!
//! Routes:
//! - `GET /api/items`, `POST /api/items` (JSON), `GET /api/items/{id}`: a
//!   JSON API (the list lives in this worker process: a pool with several
//!   workers has one list each);
//! - `POST /form` (`application/x-www-form-urlencoded`): a form;
//! - `GET /stream?lines=N&delay_ms=D`: a response of unknown length,
//!   produced line by line (chunked to HTTP/1.1 clients);
//! - `GET /trailers`: a chunked response that ends with a trailer field;
//! - `POST` or `PUT /upload`: reads the body as it arrives and answers its length
//!   and FNV-1a checksum (a 1 GiB upload never sits in memory);
//! - `GET /whoami`: the client's address, from axum's `ConnectInfo` (which
//!   `worker::serve` provides as `axum::serve` does);
//! - `GET /`: what this is.
//!
//! Run it in a pool with `cargo xtask run -- --config examples/apps/axum.toml`,
//! or on its own port with `axum-example --listen 127.0.0.1:3000` (plain
//! hyper through `axum::serve`: the benchmarks' `direct` peer).

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    body::Body,
    extract::{ConnectInfo, Path, Query, State},
    http::{header, HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
    Form, Json, Router,
};
use bytes::Bytes;
use http_body::Frame;
use serde::{Deserialize, Serialize};

#[derive(Clone, Default)]
struct App {
    items: Arc<Mutex<Vec<Item>>>,
}

#[derive(Clone, Serialize, Deserialize)]
struct Item {
    #[serde(default)]
    id: u64,
    name: String,
    #[serde(default)]
    price_cents: u64,
}

fn app() -> Router {
    Router::new()
        .route("/", get(index))
        .route("/api/items", get(list_items).post(add_item))
        .route("/api/items/{id}", get(get_item))
        .route("/form", post(form))
        .route("/stream", get(stream))
        .route("/trailers", get(trailers))
        .route("/upload", post(upload).put(upload))
        .route("/whoami", get(whoami))
        .with_state(App::default())
}

async fn whoami(ConnectInfo(addr): ConnectInfo<SocketAddr>) -> String {
    format!("{addr}\n")
}

async fn index() -> &'static str {
    "an axum app in a dispatcher pool: try /api/items, POST /form, /stream, POST /upload\n"
}

async fn list_items(State(app): State<App>) -> Json<Vec<Item>> {
    Json(app.items.lock().unwrap().clone())
}

async fn add_item(State(app): State<App>, Json(mut item): Json<Item>) -> (StatusCode, Json<Item>) {
    let mut items = app.items.lock().unwrap();
    item.id = items.len() as u64 + 1;
    items.push(item.clone());
    (StatusCode::CREATED, Json(item))
}

async fn get_item(State(app): State<App>, Path(id): Path<u64>) -> Result<Json<Item>, StatusCode> {
    let items = app.items.lock().unwrap();
    items.iter().find(|i| i.id == id).cloned().map(Json).ok_or(StatusCode::NOT_FOUND)
}

#[derive(Deserialize)]
struct Signup {
    name: String,
    email: String,
}

async fn form(Form(f): Form<Signup>) -> impl IntoResponse {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("welcome, {} <{}>\n", f.name, f.email),
    )
}

#[derive(Deserialize)]
struct StreamParams {
    lines: Option<u32>,
    delay_ms: Option<u64>,
}

async fn stream(Query(p): Query<StreamParams>) -> Response {
    let lines = p.lines.unwrap_or(5).min(10_000_000);
    let delay = Duration::from_millis(p.delay_ms.unwrap_or(50).min(5_000));
    let body = futures_util::stream::unfold(0u32, move |i| async move {
        if i == lines {
            return None;
        }
        if i > 0 && !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        Some((Ok::<_, Infallible>(Bytes::from(format!("line {i}\n"))), i + 1))
    });
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], Body::from_stream(body)).into_response()
}

async fn trailers() -> Response {
    let mut t = HeaderMap::new();
    t.insert("x-checksum", fnv(b"part one\npart two\n").to_string().parse().unwrap());
    let frames = futures_util::stream::iter([
        Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"part one\n"))),
        Ok(Frame::data(Bytes::from_static(b"part two\n"))),
        Ok(Frame::trailers(t)),
    ]);
    let body = http_body_util::StreamBody::new(frames);
    ([(header::TRAILER, "x-checksum")], Body::new(body)).into_response()
}

async fn upload(mut body: Body) -> Result<Json<serde_json::Value>, (StatusCode, String)> {
    use http_body_util::BodyExt;
    let mut n: u64 = 0;
    let mut h: u64 = FNV_OFFSET;
    let mut trailers = serde_json::Map::new();
    while let Some(f) = body.frame().await {
        let f = f.map_err(|e| (StatusCode::BAD_REQUEST, format!("{e}\n")))?;
        match f.into_data() {
            Ok(c) => {
                n += c.len() as u64;
                h = fnv_more(h, &c);
            }
            // A chunked upload's trailer fields, if it sent any.
            Err(f) => {
                for (k, v) in f.into_trailers().iter().flatten() {
                    trailers.insert(k.to_string(), String::from_utf8_lossy(v.as_bytes()).into());
                }
            }
        }
    }
    Ok(Json(serde_json::json!({ "bytes": n, "fnv1a64": h.to_string(), "trailers": trailers })))
}

const FNV_OFFSET: u64 = 0xcbf29ce484222325;

fn fnv_more(mut h: u64, b: &[u8]) -> u64 {
    for &x in b {
        h = (h ^ x as u64).wrapping_mul(0x100000001b3);
    }
    h
}

fn fnv(b: &[u8]) -> u64 {
    fnv_more(FNV_OFFSET, b)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let mut args = std::env::args().skip(1);
    match (args.next().as_deref(), args.next()) {
        (Some("--listen"), Some(addr)) => {
            // Plain axum on its own port: the same app without a dispatcher.
            let listener = tokio::net::TcpListener::bind(&addr).await?;
            axum::serve(listener, app().into_make_service_with_connect_info::<SocketAddr>()).await?;
        }
        (None, _) => worker::serve(app()).await?,
        _ => anyhow::bail!(
            "usage: axum-example [--listen ADDR]  (no arguments: serve the dispatcher pool it is started for)"
        ),
    }
    Ok(())
}
