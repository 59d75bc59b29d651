//! `POST /v1/jobs` (202 at once, with the job), `GET /v1/jobs/{id}` (state, queue position,
//! progress, latest preview, result or error), `DELETE /v1/jobs/{id}` (cancel).
//!
//! A new job's Generate call is polled once before the answer: a request that validation or
//! a full admission queue refuses gets its 400 / 429 at once; one that has to wait is
//! `queued`; one admitted at once is `running`. A task then drives it to the end.

use std::{future::Future, pin::Pin, task::Poll, time::Duration};

use axum::{
    Json,
    extract::{Path, Request, State},
    http::{StatusCode, header::LOCATION},
    response::{IntoResponse, Response},
};
use tokio_stream::StreamExt;

use super::{
    AppState,
    error::ApiError,
    jobs::{JobStore, JobView, Stop},
    openai::read_body,
    run::{self, Events},
};

type Admitting = Pin<Box<dyn Future<Output = Result<Events, ApiError>> + Send>>;

enum Admission {
    Waiting(Admitting),
    Admitted(Events),
}

/// Drives one job to the end, or until it is cancelled; then says it has stopped.
async fn drive(store: JobStore, id: String, stop: Stop, admission: Admission) {
    let work = async {
        let mut events = match admission {
            Admission::Admitted(events) => events,
            Admission::Waiting(admitting) => {
                let events = admitting.await?;
                store.admitted(&id);
                events
            }
        };
        while let Some(msg) = events.next().await {
            store.record(&id, msg?);
        }
        Ok::<(), ApiError>(())
    };
    tokio::select! {
        outcome = work => store.finish(&id, outcome),
        () = stop.requested.cancelled() => tracing::info!(job = %id, "job cancelled"),
    }
    stop.done.cancel();
}

fn view(state: &AppState, id: &str) -> Result<JobView, ApiError> {
    state.jobs.view(id, state.api.admission())
}

/// `POST /v1/jobs`: the body of `/v1/images/generations` (JSON) or `/v1/images/edits`
/// (multipart, `image` optional).
pub async fn create(State(state): State<AppState>, req: Request) -> Result<Response, ApiError> {
    let headers = req.headers().clone();
    let image = read_body(&state, req, false).await?;
    if image.stream {
        return Err(ApiError::invalid(
            "stream",
            "stream: not available for jobs; poll GET /v1/jobs/{id}",
        ));
    }
    state.jobs.check_room()?;
    let seed = image.generate.seed;
    let grpc = run::grpc_request(image.generate, &headers)?;
    let timeout = Duration::from_secs(state.config.default_timeout_secs);
    let mut admitting: Admitting = Box::pin(run::start(state.api.clone(), grpc, timeout));
    let first = std::future::poll_fn(|cx| Poll::Ready(admitting.as_mut().poll(cx))).await;
    let admission = match first {
        Poll::Ready(result) => Admission::Admitted(result?),
        Poll::Pending => Admission::Waiting(admitting),
    };
    let queued = matches!(admission, Admission::Waiting(_));
    let (id, stop) = state.jobs.insert(queued, state.api.admission(), seed);
    tokio::spawn(drive(state.jobs.clone(), id.clone(), stop, admission));
    let body = view(&state, &id)?;
    Ok((
        StatusCode::ACCEPTED,
        [(LOCATION, format!("/v1/jobs/{id}"))],
        Json(body),
    )
        .into_response())
}

/// `GET /v1/jobs/{id}`.
pub async fn get(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<JobView>, ApiError> {
    Ok(Json(view(&state, &id)?))
}

/// The longest `DELETE /v1/jobs/{id}` waits for the job's task to stop.
const STOP_WAIT: Duration = Duration::from_secs(5);

/// `DELETE /v1/jobs/{id}`: cancels a queued or running job (409 once it ended). Answers once
/// the job's task has dropped its place in the admission queue and its event stream (at once,
/// unless the runtime is starved: at most [`STOP_WAIT`]), so a request sent after the answer
/// finds the queue place free.
pub async fn cancel(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<JobView>, ApiError> {
    let stopped = state.jobs.cancel(&id)?;
    if tokio::time::timeout(STOP_WAIT, stopped.cancelled())
        .await
        .is_err()
    {
        tracing::warn!(job = %id, "cancelled job still stopping");
    }
    Ok(Json(view(&state, &id)?))
}
