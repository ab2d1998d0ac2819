//! The HTTP service: end-user credits routes (Clerk), admin routes (bearer
//! token), health and Prometheus metrics.

mod admin;
mod api_keys;
pub mod auth;
mod auto_recharge;
mod body;
mod chat;
mod clerk_webhooks;
mod console;
mod credits;
mod email_preferences;
pub mod error;
mod extract;
mod gateway;
mod openapi;
pub mod pages;
mod provider_keys;
mod rate_limits;
mod referrals;
mod spending;
mod state;
mod stripe;
mod topup;
mod views;

use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::dev::{Server, Service, ServiceRequest};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::{web, App, HttpResponse, HttpServer};
use futures_util::future::{ready, Either};

use crate::config::Settings;
use error::{ApiError, Code};
pub use state::{AppState, Services, State};

static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The caller's `X-Request-Id` when it is a short printable token, else a new one.
fn request_id(request: &ServiceRequest) -> String {
    request
        .headers()
        .get(&REQUEST_ID)
        .and_then(|value| value.to_str().ok())
        .filter(|id| !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_graphic()))
        .map_or_else(|| uuid::Uuid::new_v4().simple().to_string(), str::to_owned)
}

/// Builds the server on `listener` (not yet running).
pub fn server(
    state: AppState,
    listener: TcpListener,
    settings: &Settings,
) -> anyhow::Result<Server> {
    let state = web::Data::new(state);
    let allowed_origins = Arc::new(settings.server.allowed_origins.clone());
    let server = HttpServer::new(move || {
        let allowed = allowed_origins.clone();
        App::new()
            .app_data(state.clone())
            .wrap_fn(move |request, service| {
                let refusal = auth::cross_site_refusal(
                    request.method(),
                    request.headers(),
                    || own_origin(&request),
                    &allowed,
                );
                match refusal {
                    Some(error) => Either::Left(ready(Ok(request.error_response(error)))),
                    None => Either::Right(service.call(request)),
                }
            })
            .wrap_fn(|request, service| {
                let started = Instant::now();
                let method = method_label(request.method());
                let request_id = request_id(&request);
                let call = service.call(request);
                async move {
                    let mut response = call.await?;
                    let route = response
                        .request()
                        .match_pattern()
                        .unwrap_or_else(|| "unmatched".to_owned());
                    let status = response.status().as_u16();
                    let elapsed = started.elapsed();
                    tracing::info!(
                        request_id = %request_id,
                        method = %method,
                        route = %route,
                        status,
                        duration_us = elapsed.as_micros() as u64,
                        "request"
                    );
                    if let Ok(value) = HeaderValue::from_str(&request_id) {
                        response.headers_mut().insert(REQUEST_ID.clone(), value);
                    }
                    let labels = [
                        ("route", route),
                        ("method", method.to_owned()),
                        ("status", status.to_string()),
                    ];
                    metrics::counter!(crate::telemetry::HTTP_REQUESTS_TOTAL.name, &labels)
                        .increment(1);
                    metrics::histogram!(
                        crate::telemetry::HTTP_REQUEST_DURATION_SECONDS.name,
                        &labels
                    )
                    .record(elapsed.as_secs_f64());
                    Ok(response)
                }
            })
            // The routes of a user or the admin: each checks its token.
            .configure(credits::routes)
            .configure(auto_recharge::routes)
            .configure(email_preferences::routes)
            .configure(admin::routes)
            .configure(topup::routes)
            .configure(chat::routes)
            .configure(provider_keys::routes)
            .configure(api_keys::routes)
            .configure(gateway::routes)
            .configure(spending::routes)
            .configure(referrals::routes)
            .service(without_token())
            .wrap(cors(&allowed_origins))
    })
    .workers(settings.server.workers)
    .client_request_timeout(Duration::from_millis(
        settings.server.client_request_timeout_ms,
    ))
    .shutdown_timeout(settings.server.shutdown_timeout_s)
    // `Application::run` drains first, then stops the server itself.
    .disable_signals()
    .listen(listener)?
    .run();
    Ok(server)
}

/// The routes that need no user or admin token (webhooks, health, metrics,
/// the document and the pages) and every unknown path, under the per-IP
/// rate: registered last, so a path no route above took lands here.
fn without_token() -> actix_web::Scope<
    impl actix_web::dev::ServiceFactory<
        ServiceRequest,
        Config = (),
        Response = actix_web::dev::ServiceResponse<impl actix_web::body::MessageBody>,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    web::scope("")
        .wrap(actix_web::middleware::from_fn(rate_limits::unauthenticated))
        .route("/healthz", web::get().to(healthz))
        .route("/readyz", web::get().to(readyz))
        .route("/metrics", web::get().to(metrics_text))
        .configure(stripe::routes)
        .configure(clerk_webhooks::routes)
        .configure(openapi::routes)
        .configure(pages::routes)
        .configure(console::routes)
        .default_service(web::to(error::no_route))
}

/// This service's origin as the browser addressed it: `scheme://Host`.
fn own_origin(request: &ServiceRequest) -> String {
    let host = request
        .headers()
        .get(actix_web::http::header::HOST)
        .and_then(|host| host.to_str().ok())
        .unwrap_or_default();
    format!("{}://{host}", request.connection_info().scheme())
}

/// CORS for the front ends of `server.allowed_origins`, credentials allowed
/// (their requests carry a bearer token or the session cookie). A foreign
/// origin gets no CORS headers (its browser then hides the answer) rather
/// than an error here: same-origin pages send `Origin` too, and writes from
/// foreign origins are refused by the cross-site check with 403.
fn cors(allowed: &[String]) -> actix_cors::Cors {
    let mut cors = actix_cors::Cors::default()
        .allowed_methods(["GET", "POST", "PUT", "DELETE"])
        .allowed_headers([
            actix_web::http::header::AUTHORIZATION,
            actix_web::http::header::CONTENT_TYPE,
            actix_web::http::header::ACCEPT,
        ])
        .expose_headers(["x-request-id", "retry-after"])
        .supports_credentials()
        .block_on_origin_mismatch(false)
        .max_age(600);
    for origin in allowed {
        cors = cors.allowed_origin(origin);
    }
    cors
}

/// The process is up.
#[utoipa::path(get, path = "/healthz", tag = "ops",
    responses(
        (status = 200, description = "Up", body = views::Status),
        error::RateLimited
    ))]
async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(views::Status { status: "ok" })
}

/// The database answered the last background check and the journal flows.
#[utoipa::path(get, path = "/readyz", tag = "ops",
    responses(
        (status = 200, description = "Ready", body = views::Status),
        error::RateLimited,
        (status = 503, description = "UNAVAILABLE (database down, journal stalled)", body = error::ErrorBody)
    ))]
async fn readyz(state: State) -> Result<HttpResponse, ApiError> {
    if state.health.draining() {
        return Err(ApiError::new(
            Code::Unavailable,
            "stopping: still serving until the balancer moved this instance's accounts",
        ));
    }
    if !state.health.database_up() {
        return Err(ApiError::new(
            Code::Unavailable,
            "the database did not answer the last health check",
        ));
    }
    if state.engine.writer().is_stalled() {
        return Err(ApiError::new(
            Code::Unavailable,
            "the journal writer is stalled",
        ));
    }
    if !state.engine.listening() {
        return Err(ApiError::new(
            Code::Unavailable,
            "not hearing other instances' writes (the notification listener is reconnecting)",
        ));
    }
    Ok(HttpResponse::Ok().json(views::Status { status: "ready" }))
}

/// The Prometheus text; with `metrics.token` set, only for its bearer.
#[utoipa::path(get, path = "/metrics", tag = "ops", security((), ("metrics" = [])),
    responses(
        (status = 200, description = "Prometheus text format 0.0.4", content_type = "text/plain", body = String),
        (status = 401, description = "UNAUTHORIZED (metrics.token set, missing or wrong)", body = error::ErrorBody),
        error::RateLimited
    ))]
async fn metrics_text(
    state: State,
    request: actix_web::HttpRequest,
) -> Result<HttpResponse, ApiError> {
    auth::require_metrics_token(&state.settings.metrics, &request)?;
    let stats = state.engine.stats();
    metrics::gauge!(crate::telemetry::ACCOUNT_ACTORS_RESIDENT.name)
        .set(stats.resident_actors as f64);
    metrics::gauge!(crate::telemetry::JOURNAL_QUEUE_DEPTH.name)
        .set(stats.journal_queue_depth as f64);
    metrics::gauge!(crate::telemetry::DATABASE_UP.name).set(if state.health.database_up() {
        1.0
    } else {
        0.0
    });
    metrics::gauge!(crate::telemetry::ACTIVE_HOLDS.name).set(state.health.active_holds() as f64);
    Ok(HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(state.metrics.render()))
}

/// The `method` label: a standard verb, else `OTHER`, so made-up methods
/// cannot add series.
fn method_label(method: &actix_web::http::Method) -> &'static str {
    use actix_web::http::Method;
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "OTHER",
    }
}
