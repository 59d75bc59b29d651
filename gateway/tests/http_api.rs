//! The OpenAI endpoints end to end (whole stack in-process, tiny model, CPU): JSON, multipart,
//! server-sent events, every mode, and bad inputs with their statuses and parameters.

mod http_common;

use http_common::{Part, decode_b64, middle_mask, picture, picture_with_hole, png, start, text};
use hyper::Method;
use klein_runtime::bytesize::ByteSize;
use serde_json::{Value, json};

fn b64_of(reply: &Value, i: usize) -> String {
    reply["data"][i]["b64_json"]
        .as_str()
        .expect("b64_json")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_endpoints_return_png_images_and_stream_events() {
    let (running, http) = start(|_| {}).await;

    let req = json!({"prompt": "a red car", "size": "96x64", "n": 2, "seed": 42, "steps": 3});
    let a = http.post_json("/v1/images/generations", req.clone()).await;
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    let a = a.json();
    assert_eq!(a["data"].as_array().unwrap().len(), 2);
    assert_eq!(
        (a["seed"].as_u64(), a["size"].as_str()),
        (Some(42), Some("96x64"))
    );
    assert_eq!(a["data"][1]["seed"], 43);
    let (w, h, px) = decode_b64(&b64_of(&a, 0));
    assert_eq!((w, h), (96, 64));
    assert!(px.iter().any(|&p| p != px[0]), "not a blank image");
    let b = http.post_json("/v1/images/generations", req).await.json();
    assert_eq!(b64_of(&a, 0), b64_of(&b, 0), "same seed, same image");
    assert_ne!(b64_of(&a, 0), b64_of(&a, 1), "image i uses seed + i");

    // The same request as multipart on the OpenAI edits endpoint: references, I2I, inpaint.
    let common = || {
        vec![
            text("prompt", "a red car"),
            text("size", "64x64"),
            text("seed", 5),
            text("steps", 4),
        ]
    };
    let mut parts = common();
    parts.push(Part::File("image[]", picture(64, 64, 0)));
    parts.push(Part::File("image[]", picture(64, 96, 90)));
    let edit = http.post_form("/v1/images/edits", &parts).await;
    assert_eq!(edit.status, 200, "{}", String::from_utf8_lossy(&edit.body));
    let mut parts = common();
    parts.push(Part::File("image", picture(64, 64, 0)));
    parts.push(text("strength", 0.5));
    let i2i = http.post_form("/v1/images/edits", &parts).await.json();
    assert_eq!(decode_b64(&b64_of(&i2i, 0)).0, 64);
    assert_ne!(
        b64_of(&i2i, 0),
        b64_of(&edit.json(), 0),
        "I2I is not a reference edit"
    );
    // Inpainting: a grey mask (white = repaint), the OpenAI transparent mask, and the alpha
    // channel of the image are the same hole.
    let inpaint = |mask: Option<Vec<u8>>, image: Vec<u8>| {
        let mut parts = common();
        parts.push(Part::File("image", image));
        parts.push(text("mode", "inpaint"));
        if let Some(m) = mask {
            parts.push(Part::File("mask", m));
        }
        parts
    };
    let grey = http
        .post_form(
            "/v1/images/edits",
            &inpaint(Some(middle_mask(64, 64)), picture(64, 64, 0)),
        )
        .await
        .json();
    let openai_mask = png(image::DynamicImage::ImageRgba8(image::RgbaImage::from_fn(
        64,
        64,
        |x, y| {
            let inside = (16..48).contains(&x) && (16..48).contains(&y);
            image::Rgba([0, 0, 0, if inside { 0 } else { 255 }])
        },
    )));
    let transparent = http
        .post_form(
            "/v1/images/edits",
            &inpaint(Some(openai_mask), picture(64, 64, 0)),
        )
        .await
        .json();
    assert_eq!(b64_of(&grey, 0), b64_of(&transparent, 0));
    let alpha = http
        .post_form(
            "/v1/images/edits",
            &inpaint(None, picture_with_hole(64, 64)),
        )
        .await;
    assert_eq!(
        alpha.status,
        200,
        "{}",
        String::from_utf8_lossy(&alpha.body)
    );

    // Streaming: progress events, partial images, then the completed image.
    let req = json!({"prompt": "x", "size": "64x64", "seed": 9, "steps": 4, "stream": true, "partial_images": 2});
    let sse = http.post_json("/v1/images/generations", req).await;
    assert_eq!(sse.status, 200);
    assert!(
        sse.content_type.starts_with("text/event-stream"),
        "{}",
        sse.content_type
    );
    let events = sse.events();
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names.first(), Some(&"klein.accepted"), "{names:?}");
    assert_eq!(
        names.last(),
        Some(&"image_generation.completed"),
        "{names:?}"
    );
    let partials: Vec<&Value> = events
        .iter()
        .filter(|(n, _)| n == "image_generation.partial_image")
        .map(|(_, d)| d)
        .collect();
    assert_eq!(partials.len(), 2, "{names:?}");
    assert_eq!(partials[1]["partial_image_index"], 1);
    assert!(names.contains(&"klein.step") && names.contains(&"klein.stage"));
    let done = &events.last().unwrap().1;
    assert_eq!(done["seed"], 9);
    let plain = http
        .post_json(
            "/v1/images/generations",
            json!({"prompt": "x", "size": "64x64", "seed": 9, "steps": 4}),
        )
        .await
        .json();
    assert_eq!(
        done["b64_json"], plain["data"][0]["b64_json"],
        "streamed = plain"
    );
    let mut parts = common();
    parts.push(Part::File("image", picture(64, 64, 0)));
    parts.push(text("stream", true));
    let names: Vec<String> = http
        .post_form("/v1/images/edits", &parts)
        .await
        .events()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(
        names.last().map(String::as_str),
        Some("image_edit.completed")
    );

    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_get_openai_errors_with_the_right_status() {
    let (running, http) = start(|o| {
        o.gateway.limits.max_input_image_bytes = ByteSize(16 << 10);
        o.gateway.limits.max_request_bytes = ByteSize(1 << 20);
    })
    .await;
    let generations = |body: Value| {
        let http = http.clone();
        async move { http.post_json("/v1/images/generations", body).await }
    };
    for (body, param) in [
        (json!({"prompt": "x", "size": "100x64"}), "size"),
        (json!({"prompt": "x", "size": "big"}), "size"),
        (
            json!({"prompt": "x", "response_format": "url"}),
            "response_format",
        ),
        (json!({"prompt": "x", "n": 99}), "n"),
        (json!({"prompt": "x", "n": 0}), "n"),
        (json!({"prompt": "x", "steps": 9999}), "steps"),
        (json!({"prompt": "x", "model": "dall-e-3"}), "model"),
        (
            json!({"prompt": "x", "output_format": "jpeg"}),
            "output_format",
        ),
        (json!({"size": "64x64"}), "prompt"),
    ] {
        let err = generations(body.clone()).await.error(400);
        assert_eq!(err["param"], param, "{body}: {err}");
        assert_eq!(err["type"], "invalid_request_error");
    }
    let bad_json = http
        .send(
            Method::POST,
            "/v1/images/generations",
            &[("content-type", "application/json".into())],
            b"{not json".to_vec(),
        )
        .await;
    bad_json.error(400);
    let edits = |parts: Vec<Part>| {
        let http = http.clone();
        async move { http.post_form("/v1/images/edits", &parts).await }
    };
    let err = edits(vec![text("prompt", "x")]).await.error(400);
    assert_eq!(err["param"], "image");
    let err = edits(vec![
        text("prompt", "x"),
        Part::File("image", picture(64, 64, 0)),
        Part::File("mask", middle_mask(64, 64)),
        text("mode", "image_to_image"),
    ])
    .await
    .error(400);
    assert_eq!(err["param"], "mask");
    let err = edits(vec![
        text("prompt", "x"),
        Part::File("image", b"not an image".to_vec()),
        text("strength", 0.5),
    ])
    .await
    .error(400);
    assert_eq!(err["param"], "image");
    let err = edits(vec![
        text("prompt", "x"),
        Part::File("image", picture(64, 64, 0)),
        text("mode", "inpaint"),
    ])
    .await
    .error(400);
    assert_eq!(err["param"], "mask", "an opaque image needs a mask: {err}");
    let big = picture(512, 512, 0);
    assert!(big.len() > 16 << 10);
    let err = edits(vec![text("prompt", "x"), Part::File("image", big)])
        .await
        .error(413);
    assert_eq!(
        (err["param"].as_str(), err["code"].as_str()),
        (Some("image"), Some("payload_too_large"))
    );
    let huge = vec![b'a'; (1 << 20) + 1];
    http.send(
        Method::POST,
        "/v1/images/generations",
        &[("content-type", "application/json".into())],
        huge,
    )
    .await
    .error(413);
    // Deadlines: the request's own X-Request-Timeout.
    let timed_out = http
        .send(
            Method::POST,
            "/v1/images/generations",
            &[
                ("content-type", "application/json".into()),
                ("x-request-timeout", "0.001".into()),
            ],
            json!({"prompt": "x", "size": "256x256", "steps": 50})
                .to_string()
                .into_bytes(),
        )
        .await;
    assert_eq!(timed_out.error(504)["code"], "timeout");
    http.get("/v1/nothing").await.error(404);
    http.get("/v1/jobs/job_unknown").await.error(404);
    running.stop().await.unwrap();
}
