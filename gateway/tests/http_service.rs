//! The job resource (queue position, progress, previews, cancel, 429, deadlines), health,
//! capabilities, the OpenAPI document, the page's assets, the API key and an unready gateway,
//! end to end (whole stack in-process, tiny model, CPU).

mod http_common;

use std::time::{Duration, Instant};

use gateway::auth::ApiKey;
use http_common::{Part, decode_b64, picture, start, text};
use hyper::Method;
use serde_json::{Value, json};

async fn job(http: &http_common::Http, body: Value) -> Value {
    let r = http.post_json("/v1/jobs", body).await;
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    r.json()
}

async fn wait_for(
    http: &http_common::Http,
    id: &str,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let until = Instant::now() + Duration::from_secs(120);
    loop {
        let j = http.get(&format!("/v1/jobs/{id}")).await.json();
        if done(&j) {
            return j;
        }
        assert!(Instant::now() < until, "timed out waiting for {what}: {j}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_queue_report_progress_cancel_and_refuse_when_full() {
    let (running, http) = start(|o| {
        o.gateway.max_concurrent_requests = 1;
        o.gateway.server.max_queue_depth = 1;
    })
    .await;
    let long =
        json!({"prompt": "long", "size": "256x256", "steps": 200, "seed": 1, "partial_images": 1});
    let a = job(&http, long.clone()).await;
    assert_eq!(a["status"], "running");
    let a_id = a["id"].as_str().unwrap().to_owned();
    let b = job(&http, long.clone()).await;
    assert_eq!(
        (b["status"].as_str(), b["queue_position"].as_u64()),
        (Some("queued"), Some(1))
    );
    let b_id = b["id"].as_str().unwrap().to_owned();
    let full = http.post_json("/v1/jobs", long.clone()).await.error(429);
    assert_eq!(full["code"], "queue_full");
    http.post_json("/v1/images/generations", long)
        .await
        .error(429);

    let running_a = wait_for(&http, &a_id, "steps and a preview", |j| {
        j["progress"]["step"].as_u64().unwrap_or(0) >= 2 && j["preview_b64_json"].is_string()
    })
    .await;
    assert_eq!(running_a["progress"]["stage"], "denoising");
    assert_eq!(running_a["progress"]["total_steps"], 200);
    let cancelled = http.delete(&format!("/v1/jobs/{b_id}")).await.json();
    assert_eq!(cancelled["status"], "cancelled");
    assert!(cancelled.get("queue_position").is_none());
    // The answer comes once the job left the admission queue.
    let caps = http.get("/v1/capabilities").await.json();
    assert_eq!(caps["queue"]["queued"], 0, "{caps}");
    // A request that cannot get a slot before its deadline ends with 504.
    let queued_too_long = http
        .send(
            Method::POST,
            "/v1/images/generations",
            &[
                ("content-type", "application/json".into()),
                ("x-request-timeout", "0.3".into()),
            ],
            json!({"prompt": "x", "size": "64x64"})
                .to_string()
                .into_bytes(),
        )
        .await;
    assert!(
        queued_too_long.error(504)["message"]
            .as_str()
            .unwrap()
            .contains("queue")
    );
    let cancelled = http.delete(&format!("/v1/jobs/{a_id}")).await.json();
    assert_eq!(cancelled["status"], "cancelled");
    let step_at_cancel = cancelled["progress"]["step"].as_u64().unwrap();
    assert!(step_at_cancel < 200);
    // Cancelling dropped the downstream work: the queue and every budget empty out quickly.
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let caps = http.get("/v1/capabilities").await.json();
        let reserved: u64 = caps["services"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["reserved_bytes"].as_u64().unwrap_or(0))
            .sum();
        if reserved == 0 && caps["queue"]["queued"] == 0 {
            break;
        }
        assert!(
            Instant::now() < until,
            "downstream work kept running: {caps}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let a_later = http.get(&format!("/v1/jobs/{a_id}")).await.json();
    assert_eq!(a_later["status"], "cancelled");
    assert_eq!(
        a_later["progress"]["step"].as_u64().unwrap(),
        step_at_cancel,
        "no step after cancel"
    );
    http.delete(&format!("/v1/jobs/{a_id}")).await.error(409);

    // A job that completes carries the OpenAI-shaped result.
    let small = job(
        &http,
        json!({"prompt": "small", "size": "64x64", "steps": 2, "seed": 3}),
    )
    .await;
    let id = small["id"].as_str().unwrap();
    let done = wait_for(&http, id, "completion", |j| {
        j["status"] != "running" && j["status"] != "queued"
    })
    .await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["seed"], 3);
    assert_eq!(
        decode_b64(done["result"]["data"][0]["b64_json"].as_str().unwrap()).0,
        64
    );
    http.delete(&format!("/v1/jobs/{id}")).await.error(409);
    // A job takes the edits' multipart body too, and fails like the API does.
    let bad = http
        .post_form("/v1/jobs", &[text("prompt", "x"), text("size", "65x64")])
        .await
        .error(400);
    assert_eq!(bad["param"], "size");
    let form = http
        .post_form(
            "/v1/jobs",
            &[
                text("prompt", "x"),
                text("mode", "image_to_image"),
                text("steps", 2),
                Part::File("image", picture(64, 64, 0)),
            ],
        )
        .await;
    assert_eq!(form.status, 202);
    let id = form.json()["id"].as_str().unwrap().to_owned();
    let done = wait_for(&http, &id, "completion", |j| j["status"] == "completed").await;
    assert_eq!(done["result"]["size"], "64x64");
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_capabilities_openapi_and_the_page_are_served() {
    let (running, http) = start(|_| {}).await;
    let health = http.get("/healthz").await;
    assert_eq!(health.status, 200);
    assert_eq!(health.json()["status"], "ok");
    let caps = http.get("/v1/capabilities").await.json();
    assert_eq!(caps["models"][0]["distilled"], true);
    assert_eq!(caps["response_formats"], json!(["b64_json"]));
    // Every stage that answers its Info within 5 s (all three, unless the machine is swamped).
    let services = caps["services"].as_array().unwrap();
    assert!(!services.is_empty() && services.iter().all(|s| s["service"].is_string()));
    assert!(caps["limits"]["max_input_image_bytes"].as_u64().unwrap() > 0);

    let doc = http.get("/openapi.json").await;
    assert!(doc.content_type.starts_with("application/json"));
    let doc = doc.json();
    assert_eq!(doc["openapi"], "3.1.0");
    for (path, method) in [
        ("/v1/images/generations", "post"),
        ("/v1/images/edits", "post"),
        ("/v1/jobs", "post"),
        ("/v1/jobs/{id}", "get"),
        ("/v1/jobs/{id}", "delete"),
        ("/healthz", "get"),
        ("/v1/capabilities", "get"),
        ("/openapi.json", "get"),
        ("/", "get"),
    ] {
        assert!(
            doc["paths"][path][method].is_object(),
            "{method} {path} is documented"
        );
    }
    let page = http.get("/").await;
    assert!(page.content_type.starts_with("text/html"));
    let html = String::from_utf8_lossy(&page.body);
    assert!(
        html.contains("app.js") && !html.contains("http://") && !html.contains("https://"),
        "no CDN"
    );
    for asset in ["app.js", "paint.js", "history.js", "style.css"] {
        let r = http.get(&format!("/{asset}")).await;
        assert_eq!(r.status, 200, "{asset}");
        assert!(
            !String::from_utf8_lossy(&r.body).contains("https://"),
            "{asset}: no CDN"
        );
    }
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_without_stages_answers_503() {
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = http_common::Http::new(http_listener.local_addr().unwrap());
    let mut config = gateway::config::Config::default();
    // Nothing listens on port 9 of loopback (discard): every stage is unavailable.
    let dead = vec!["http://127.0.0.1:9".to_owned()];
    config.encoder_addrs = dead.clone();
    config.denoiser_addrs = dead.clone();
    config.vae_addrs = dead;
    let stop = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(gateway::serve_with_http(
        config,
        grpc,
        Some(http_listener),
        stop.clone().cancelled_owned(),
    ));
    let health = http.get("/healthz").await;
    assert_eq!(health.status, 503);
    let err = http
        .post_json("/v1/images/generations", json!({"prompt": "x"}))
        .await
        .error(503);
    assert_eq!(err["code"], "unavailable");
    http.post_json("/v1/jobs", json!({"prompt": "x"}))
        .await
        .error(503);
    stop.cancel();
    server.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_api_key_the_v1_routes_need_it_and_the_page_does_not() {
    let (running, http) = start(|o| o.gateway.api_key = Some(ApiKey::new("s3cret"))).await;
    let err = http.get("/v1/capabilities").await.error(401);
    assert_eq!(err["code"], "invalid_api_key");
    let wrong = [("authorization", "Bearer nope".to_owned())];
    http.send(Method::GET, "/v1/capabilities", &wrong, Vec::new())
        .await
        .error(401);
    http.post_json("/v1/jobs", json!({"prompt": "x"}))
        .await
        .error(401);
    for header in [
        ("authorization", "Bearer s3cret".to_owned()),
        ("x-api-key", "s3cret".to_owned()),
    ] {
        let ok = http
            .send(Method::GET, "/v1/capabilities", &[header], Vec::new())
            .await;
        assert_eq!(ok.status, 200);
    }
    for open in ["/", "/app.js", "/healthz", "/openapi.json"] {
        assert_eq!(http.get(open).await.status, 200, "{open}");
    }
    running.stop().await.unwrap();
}
