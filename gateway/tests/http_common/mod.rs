//! Shared harness of the HTTP tests: the whole stack in-process (tiny bundled model, CPU)
//! with the HTTP API on 127.0.0.1:0, a small HTTP/1.1 client and image helpers.

#![allow(dead_code)]

use std::{io::Cursor, net::SocketAddr, time::Duration};

use bytes::Bytes;
use gateway::stack::{self, RunningStack, StackOptions};
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use image::{DynamicImage, RgbImage, RgbaImage};
use klein_runtime::device::DeviceSpec;

/// The stack with HTTP, after `tweak` adjusted its options.
pub async fn start(tweak: impl FnOnce(&mut StackOptions)) -> (RunningStack, Http) {
    let mut opts = StackOptions::new(
        &stack::bundled_model(),
        DeviceSpec::Cpu,
        ([127, 0, 0, 1], 0).into(),
    );
    opts.gateway.http_listen = Some(([127, 0, 0, 1], 0).into());
    tweak(&mut opts);
    let mut running = stack::start(opts).await.expect("stack starts");
    running
        .ready(Duration::from_secs(300))
        .await
        .expect("stack becomes ready");
    let http = Http::new(running.http_addr.expect("HTTP is on"));
    (running, http)
}

/// A response: status, content type and body.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub content_type: String,
    pub body: Bytes,
}

impl Reply {
    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// Asserts an OpenAI-shaped error with `status`; returns the error object.
    pub fn error(&self, status: u16) -> serde_json::Value {
        assert_eq!(
            self.status.as_u16(),
            status,
            "{}",
            String::from_utf8_lossy(&self.body)
        );
        let err = self.json()["error"].clone();
        assert!(
            err["message"].is_string() && err["type"].is_string(),
            "{err}"
        );
        err
    }

    /// Server-sent events as (event, JSON data).
    pub fn events(&self) -> Vec<(String, serde_json::Value)> {
        let text = String::from_utf8_lossy(&self.body);
        text.split("\n\n")
            .filter_map(|block| {
                let mut name = None;
                let mut data = None;
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event: ") {
                        name = Some(v.to_owned());
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data = Some(serde_json::from_str(v).expect("event data is JSON"));
                    }
                }
                Some((name?, data?))
            })
            .collect()
    }
}

/// A tiny client of the HTTP API.
#[derive(Clone)]
pub struct Http {
    pub addr: SocketAddr,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Http {
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// Sends a request with `headers`.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, String)],
        body: Vec<u8>,
    ) -> Reply {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.addr));
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        let resp = self
            .client
            .request(req.body(Full::new(Bytes::from(body))).unwrap())
            .await
            .expect("HTTP request");
        let status = resp.status();
        let content_type = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        Reply {
            status,
            content_type,
            body,
        }
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.send(Method::GET, path, &[], Vec::new()).await
    }

    pub async fn delete(&self, path: &str) -> Reply {
        self.send(Method::DELETE, path, &[], Vec::new()).await
    }

    pub async fn post_json(&self, path: &str, body: serde_json::Value) -> Reply {
        let ct = [("content-type", "application/json".to_owned())];
        self.send(Method::POST, path, &ct, body.to_string().into_bytes())
            .await
    }

    pub async fn post_form(&self, path: &str, parts: &[Part]) -> Reply {
        let (ct, body) = multipart(parts);
        self.send(Method::POST, path, &[("content-type", ct)], body)
            .await
    }
}

/// One multipart field.
pub enum Part {
    Text(&'static str, String),
    File(&'static str, Vec<u8>),
}

/// A text field.
pub fn text(name: &'static str, value: impl ToString) -> Part {
    Part::Text(name, value.to_string())
}

/// A multipart/form-data body: (content type, bytes).
pub fn multipart(parts: &[Part]) -> (String, Vec<u8>) {
    const BOUNDARY: &str = "kleinTestBoundary7MA4YWxkTrZu0gW";
    let mut body = Vec::new();
    for part in parts {
        body.extend_from_slice(format!("--{BOUNDARY}\r\n").as_bytes());
        match part {
            Part::Text(name, value) => {
                body.extend_from_slice(
                    format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}")
                        .as_bytes(),
                );
            }
            Part::File(name, bytes) => {
                body.extend_from_slice(
                    format!(
                        "Content-Disposition: form-data; name=\"{name}\"; filename=\"{name}.png\"\r\nContent-Type: image/png\r\n\r\n"
                    )
                    .as_bytes(),
                );
                body.extend_from_slice(bytes);
            }
        }
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={BOUNDARY}"), body)
}

/// PNG bytes of an image.
pub fn png(img: DynamicImage) -> Vec<u8> {
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

/// An opaque `w x h` test picture (smooth gradients).
pub fn picture(w: u32, h: u32, phase: u8) -> Vec<u8> {
    png(DynamicImage::ImageRgb8(RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            (x * 255 / w) as u8,
            (y * 255 / h) as u8,
            phase.wrapping_add((x + y) as u8),
        ])
    })))
}

/// The picture with a transparent square in the middle (the hole to repaint).
pub fn picture_with_hole(w: u32, h: u32) -> Vec<u8> {
    png(DynamicImage::ImageRgba8(RgbaImage::from_fn(
        w,
        h,
        |x, y| {
            let hole = (w / 4..3 * w / 4).contains(&x) && (h / 4..3 * h / 4).contains(&y);
            image::Rgba([
                (x * 4) as u8,
                (y * 4) as u8,
                128,
                if hole { 0 } else { 255 },
            ])
        },
    )))
}

/// A grey mask: white (repaint) in the middle square.
pub fn middle_mask(w: u32, h: u32) -> Vec<u8> {
    png(DynamicImage::ImageLuma8(image::GrayImage::from_fn(
        w,
        h,
        |x, y| {
            let inside = (w / 4..3 * w / 4).contains(&x) && (h / 4..3 * h / 4).contains(&y);
            image::Luma([if inside { 255 } else { 0 }])
        },
    )))
}

/// The decoded RGB pixels of base64 PNG data: (width, height, pixels).
pub fn decode_b64(b64: &str) -> (u32, u32, Vec<u8>) {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .expect("base64");
    let img = image::load_from_memory(&bytes).expect("PNG").to_rgb8();
    (img.width(), img.height(), img.into_raw())
}
