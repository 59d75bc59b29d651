//! `stream=true`: a Generate event stream as server-sent events, named as in the OpenAI
//! Images streaming API (`image_generation.*` / `image_edit.*`) plus `klein.*` progress
//! events. Dropping the response (the client went away) drops the event stream, which
//! cancels the downstream work.

use std::convert::Infallible;

use axum::response::sse::{Event, KeepAlive, Sse};
use base64::{Engine as _, engine::general_purpose::STANDARD};
use klein_proto::pb::{self, generate_response::Event as GenEvent};
use serde_json::json;
use tokio_stream::{Stream, StreamExt};

use super::{
    error::ApiError,
    run::{Events, ImageData, TimingsJson, stage_name, unix_now},
};

/// Which endpoint's event names to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `image_generation.partial_image` / `image_generation.completed`.
    Generation,
    /// `image_edit.partial_image` / `image_edit.completed`.
    Edit,
}

impl Family {
    fn prefix(self) -> &'static str {
        match self {
            Self::Generation => "image_generation",
            Self::Edit => "image_edit",
        }
    }
}

/// Whether step `step` of `total` carries one of `wanted` evenly spread partial images.
pub fn is_partial_step(step: u32, total: u32, wanted: u32) -> bool {
    let (step, total, wanted) = (u64::from(step), u64::from(total.max(1)), u64::from(wanted));
    step >= 1 && step * wanted / total > (step - 1) * wanted / total
}

fn event(name: &str, data: serde_json::Value) -> Event {
    Event::default().event(name).data(data.to_string())
}

/// The error event that ends a failed stream.
pub fn error_event(err: &ApiError) -> Event {
    event("error", json!({"type": "error", "error": err.body()}))
}

/// Translates one Generate event; `partials` counts partial images sent so far.
fn translate(resp: pb::GenerateResponse, family: Family, wanted: u32, partials: &mut u32) -> Event {
    let prefix = family.prefix();
    match resp.event {
        Some(GenEvent::Accepted(a)) => event(
            "klein.accepted",
            json!({"type": "klein.accepted", "request_id": a.request_id, "seed": a.seed}),
        ),
        Some(GenEvent::Stage(s)) => event(
            "klein.stage",
            json!({"type": "klein.stage", "stage": stage_name(s.stage)}),
        ),
        Some(GenEvent::Step(s))
            if !s.preview_png.is_empty() && is_partial_step(s.step, s.total_steps, wanted) =>
        {
            let name = format!("{prefix}.partial_image");
            let index = *partials;
            *partials += 1;
            event(
                &name,
                json!({
                    "type": name, "b64_json": STANDARD.encode(&s.preview_png),
                    "partial_image_index": index, "created_at": unix_now(), "output_format": "png",
                    "step": s.step, "total_steps": s.total_steps,
                }),
            )
        }
        Some(GenEvent::Step(s)) => event(
            "klein.step",
            json!({"type": "klein.step", "step": s.step, "total_steps": s.total_steps}),
        ),
        Some(GenEvent::Image(img)) => {
            let name = format!("{prefix}.completed");
            let data = ImageData::from(&img);
            event(
                &name,
                json!({
                    "type": name, "b64_json": data.b64_json, "created_at": unix_now(),
                    "size": format!("{}x{}", img.width, img.height), "output_format": "png",
                    "index": img.index, "seed": img.seed, "width": img.width, "height": img.height,
                    "timings": img.timings.as_ref().map(TimingsJson::from), "warnings": img.warnings,
                }),
            )
        }
        None => Event::default().comment("empty event"),
    }
}

/// The SSE response for `events`, with at most `partial_images` previews.
pub fn stream(
    events: Events,
    family: Family,
    partial_images: u32,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let mut partials = 0;
    let events = events.map(move |msg| {
        Ok(match msg {
            Ok(resp) => translate(resp, family, partial_images, &mut partials),
            Err(status) => error_event(&ApiError::from(status)),
        })
    });
    Sse::new(events).keep_alive(KeepAlive::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_images_are_spread_over_the_steps() {
        let pick = |total, wanted| {
            (1..=total)
                .filter(|&s| is_partial_step(s, total, wanted))
                .collect::<Vec<_>>()
        };
        assert_eq!(pick(4, 0), Vec::<u32>::new());
        assert_eq!(pick(4, 2), vec![2, 4]);
        assert_eq!(pick(8, 3), vec![3, 6, 8]);
        assert_eq!(pick(2, 3), vec![1, 2]);
    }
}
