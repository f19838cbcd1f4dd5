//! The HTTP API of `qosmos serve`: orders, stores, health, the OpenAPI document.
//!
//! Every error answer is `{"error": "..."}` and names the field, parameter or header at
//! fault: `400` for a body that is not JSON or a bad query parameter or header, `422`
//! for JSON that is not a valid order (or an `Idempotency-Key` reused with another
//! body), `413` for a body over [`MAX_BODY_BYTES`], `404` for an unknown order.
//!
//! `POST /api/orders` reads the body as JSON whatever its `Content-Type` says. Query
//! parameters are strict too: an unknown or repeated parameter is a `400`; an empty
//! value (`?store_id=`) means no filter.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::future::Future;
use std::sync::{Arc, OnceLock};

use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures_util::StreamExt;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::Serialize;
use serde_json::json;
use tokio::net::TcpListener;
use tower_http::trace::TraceLayer;

use crate::dispatch::{Dispatcher, NoDirectory, NoDispatcher, StoreDirectory, Subscription};
use crate::events::{EventConfig, EventHub, SubscribeError};
use crate::id::OrderId;
use crate::metrics::OrderMetrics;
use crate::model::{InputError, NewOrder, Status, StoreId};
use crate::store::{
    CreateError, IdempotencyKey, ListFilter, MAX_LIST_LIMIT, OrderStore, StoreError,
};

/// The largest `POST /api/orders` body accepted; larger gets `413`.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// The header that makes `POST /api/orders` safe to retry.
pub const IDEMPOTENCY_KEY: &str = "Idempotency-Key";

static OPENAPI: &str = include_str!("openapi.json");
static DASHBOARD: &str = include_str!("dashboard.html");

/// What every handler shares: the order store, the dispatcher to notify, the directory
/// of stores.
#[derive(Clone)]
pub struct AppState {
    store: OrderStore,
    dispatcher: Arc<dyn Dispatcher>,
    directory: Arc<dyn StoreDirectory>,
    metrics: Option<Arc<OrderMetrics>>,
    extra_metrics: Option<MetricsSource>,
    event_config: EventConfig,
    /// Made on first use from the store and directory above, shared by every clone.
    events: Arc<OnceLock<EventHub>>,
}

/// More Prometheus text to append to `GET /metrics` (the embedded broker's metrics).
pub type MetricsSource = Arc<dyn Fn() -> String + Send + Sync>;

impl AppState {
    /// State over `store`, with no dispatcher and no directory (orders stay `received`,
    /// `GET /api/stores` lists only stores with pending orders).
    pub fn new(store: OrderStore) -> Self {
        AppState {
            store,
            dispatcher: Arc::new(NoDispatcher),
            directory: Arc::new(NoDirectory),
            metrics: None,
            extra_metrics: None,
            event_config: EventConfig::default(),
            events: Arc::new(OnceLock::new()),
        }
    }

    /// Polls and keep-alive timings of `GET /api/events` (before its first use).
    pub fn with_event_config(mut self, config: EventConfig) -> Self {
        self.event_config = config;
        self.events = Arc::new(OnceLock::new());
        self
    }

    /// Serves `metrics` (the dispatcher's and the ack consumer's) on `GET /metrics`.
    pub fn with_metrics(mut self, metrics: Arc<OrderMetrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Appends what `source` renders to `GET /metrics` (e.g. the embedded broker's metrics),
    /// so that one scrape sees the whole process.
    pub fn with_extra_metrics(mut self, source: MetricsSource) -> Self {
        self.extra_metrics = Some(source);
        self
    }

    /// Notifies `dispatcher` of each new order after it is committed.
    pub fn with_dispatcher(mut self, dispatcher: Arc<dyn Dispatcher>) -> Self {
        self.dispatcher = dispatcher;
        self
    }

    /// Answers `GET /api/stores` from `directory`.
    pub fn with_directory(mut self, directory: Arc<dyn StoreDirectory>) -> Self {
        self.directory = directory;
        self.events = Arc::new(OnceLock::new());
        self
    }

    /// The live event hub behind `GET /api/events`: one per state (and its clones), made on
    /// first use from the store and the directory. [`EventHub::close`] ends its streams.
    pub fn events(&self) -> &EventHub {
        self.events.get_or_init(|| {
            EventHub::new(
                self.store.clone(),
                self.directory.clone(),
                self.event_config.clone(),
            )
        })
    }

    /// The order store.
    pub fn store(&self) -> &OrderStore {
        &self.store
    }
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

/// The service's routes:
///
/// | route | |
/// |---|---|
/// | `POST /api/orders` | create (`Idempotency-Key` optional) |
/// | `GET /api/orders/{id}` | one order with history |
/// | `GET /api/orders?store_id=&status=&limit=` | newest first |
/// | `GET /api/stores` | stores: online, subscriptions, pending |
/// | `GET /api/events` | live events (server-sent events): order status changes, stores; see [`crate::events`] |
/// | `GET /api/openapi.json` | this API as OpenAPI 3.1 |
/// | `GET /healthz` | 200 when the database answers |
/// | `GET /metrics` | Prometheus text: the service's metrics, then any extra source's |
/// | `GET /` | the dashboard |
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/api/orders", get(list_orders).post(create_order))
        .route("/api/orders/{id}", get(get_order))
        .route("/api/stores", get(list_stores))
        .route("/api/events", get(events))
        .route("/api/openapi.json", get(openapi))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/", get(dashboard))
        .fallback(not_found)
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

/// Serves [`router`] on `listener` until `shutdown` completes, then ends the event
/// streams and finishes the requests in progress.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let hub = state.events().clone();
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move {
            shutdown.await;
            hub.close();
        })
        .await
}

/// An error answer: a status and `{"error": message}`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }

    fn internal(what: &str, err: &dyn std::error::Error) -> Self {
        tracing::error!(error = %err, "{what}");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("internal error: {what}"),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "error": self.message }))).into_response()
    }
}

async fn create_order(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("body: larger than {MAX_BODY_BYTES} bytes"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(too_large());
    }
    let key = match headers.get(IDEMPOTENCY_KEY) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(IdempotencyKey::parse)
                .ok_or_else(|| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        format!(
                            "{IDEMPOTENCY_KEY}: must be 1 to {} visible ASCII characters",
                            IdempotencyKey::MAX_LEN
                        ),
                    )
                })?,
        ),
    };
    let bytes: Bytes = match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<LengthLimitError>() => return Err(too_large()),
        Err(e) => {
            tracing::debug!(error = %e, "reading an order body failed");
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "body: could not be read",
            ));
        }
    };
    let new = NewOrder::from_json(&bytes).map_err(|e| match e {
        InputError::Malformed(_) => ApiError::new(StatusCode::BAD_REQUEST, e.to_string()),
        _ => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()),
    })?;
    let created = match state.store.create(&new, key.as_ref()).await {
        Ok(c) => c,
        Err(e @ CreateError::KeyReused { .. }) => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                e.to_string(),
            ));
        }
        Err(e) => return Err(ApiError::internal("storing the order failed", &e)),
    };
    let id = created.order.order.id.clone();
    let status = if created.fresh {
        tracing::debug!(target: crate::STAGE_TARGET, order_id = %id, stage = "committed");
        // DEBUG, not INFO: one line per order costs serve ~6% of its CPU at thousands of
        // orders/s, and the order's history (GET /api/orders/{id}) is its record.
        tracing::debug!(order_id = %id, store_id = %new.store_id, "order received");
        state.dispatcher.notify_new_order(&id);
        if let Some(hub) = state.events.get() {
            hub.nudge();
        }
        StatusCode::CREATED
    } else {
        tracing::info!(order_id = %id, "idempotent retry answered with the stored order");
        StatusCode::OK
    };
    let mut response = (status, Json(created.order)).into_response();
    if let Ok(location) = HeaderValue::from_str(&format!("/api/orders/{id}")) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

async fn get_order(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = OrderId::from_string(id);
    match state.store.get(&id).await {
        Ok(Some(detail)) => Ok(Json(detail).into_response()),
        Ok(None) => Err(ApiError::new(StatusCode::NOT_FOUND, "order not found")),
        Err(e) => Err(ApiError::internal("reading the order failed", &e)),
    }
}

async fn list_orders(
    State(state): State<AppState>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(pairs) = query
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("query: {}", e.body_text())))?;
    let filter = parse_list_query(&pairs)?;
    match state.store.list(&filter).await {
        Ok(orders) => Ok(Json(orders).into_response()),
        Err(e) => Err(ApiError::internal("listing orders failed", &e)),
    }
}

fn parse_list_query(pairs: &[(String, String)]) -> Result<ListFilter, ApiError> {
    let bad =
        |name: &str, msg: &str| ApiError::new(StatusCode::BAD_REQUEST, format!("{name}: {msg}"));
    let mut filter = ListFilter::default();
    let mut seen = Vec::new();
    for (name, value) in pairs {
        if seen.contains(&name) {
            return Err(bad(name, "given more than once"));
        }
        seen.push(name);
        // An empty value (a form's blank field) means "no filter".
        if value.is_empty() {
            continue;
        }
        match name.as_str() {
            "store_id" => {
                let id = StoreId::parse(value).map_err(|e| bad(name, &e.to_string()))?;
                filter.store_id = Some(id);
            }
            "status" => {
                let st: Status = value
                    .parse()
                    .map_err(|e: crate::model::UnknownStatus| bad(name, &e.to_string()))?;
                filter.status = Some(st);
            }
            "limit" => {
                filter.limit = value
                    .parse::<u32>()
                    .ok()
                    .filter(|n| (1..=MAX_LIST_LIMIT).contains(n))
                    .ok_or_else(|| {
                        bad(
                            name,
                            &format!("must be an integer from 1 to {MAX_LIST_LIMIT}"),
                        )
                    })?;
            }
            _ => return Err(bad(name, "unknown query parameter")),
        }
    }
    Ok(filter)
}

/// One row of `GET /api/stores`.
#[derive(Debug, Serialize)]
pub(crate) struct StoreView {
    store_id: StoreId,
    online: bool,
    subscriptions: Vec<Subscription>,
    pending: u64,
}

async fn list_stores(State(state): State<AppState>) -> Result<Response, ApiError> {
    let rows = store_rows(&state.store, state.directory.as_ref())
        .await
        .map_err(|e| ApiError::internal("counting pending orders failed", &e))?;
    Ok(Json(rows).into_response())
}

/// The rows of `GET /api/stores` (also the `stores` event): the directory's stores and
/// every store with pending orders, by id.
pub(crate) async fn store_rows(
    store: &OrderStore,
    directory: &dyn StoreDirectory,
) -> Result<Vec<StoreView>, StoreError> {
    let mut pending = store.pending_by_store().await?;
    let mut rows: BTreeMap<StoreId, StoreView> = BTreeMap::new();
    for p in directory.stores() {
        let n = pending.remove(&p.store_id).unwrap_or(0);
        rows.insert(
            p.store_id.clone(),
            StoreView {
                store_id: p.store_id,
                online: p.online,
                subscriptions: p.subscriptions,
                pending: n,
            },
        );
    }
    for (store_id, n) in pending {
        rows.insert(
            store_id.clone(),
            StoreView {
                store_id,
                online: false,
                subscriptions: Vec::new(),
                pending: n,
            },
        );
    }
    Ok(rows.into_values().collect())
}

/// `GET /api/events`: see [`crate::events`].
async fn events(State(state): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    let last_event_id = match headers.get("last-event-id") {
        None => None,
        Some(v) => Some(v.to_str().map_err(|_| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                SubscribeError::BadLastEventId.to_string(),
            )
        })?),
    };
    let hub = state.events();
    let stream = match hub.subscribe(last_event_id).await {
        Ok(s) => s,
        Err(e @ SubscribeError::BadLastEventId) => {
            return Err(ApiError::new(StatusCode::BAD_REQUEST, e.to_string()));
        }
        Err(SubscribeError::Store(e)) => {
            return Err(ApiError::internal("opening the event stream failed", &e));
        }
    };
    let stream = stream.map(|e| Ok::<_, Infallible>(e.to_sse()));
    let mut response = Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(hub.config().keep_alive))
        .into_response();
    // A reverse proxy (nginx) must pass each event on at once.
    response
        .headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

async fn healthz(State(state): State<AppState>) -> Response {
    match state.store.ping().await {
        Ok(()) => (StatusCode::OK, "ok\n").into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "health check: database does not answer");
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "database unavailable").into_response()
        }
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    let mut text = state
        .metrics
        .as_ref()
        .map(|m| m.render())
        .unwrap_or_default();
    let hub = state.events();
    let _ = write!(
        text,
        "# HELP qosmos_orders_event_streams Open GET /api/events streams.\n\
         # TYPE qosmos_orders_event_streams gauge\n\
         qosmos_orders_event_streams {}\n\
         # HELP qosmos_orders_event_poller_running 1 while the shared change poller runs (while a stream is open).\n\
         # TYPE qosmos_orders_event_poller_running gauge\n\
         qosmos_orders_event_poller_running {}\n\
         # HELP qosmos_orders_event_resyncs_total Event streams that fell behind and resynced from the database.\n\
         # TYPE qosmos_orders_event_resyncs_total counter\n\
         qosmos_orders_event_resyncs_total {}\n",
        hub.subscribers(),
        u8::from(hub.poller_running()),
        hub.resyncs()
    );
    if let Some(extra) = &state.extra_metrics {
        text.push_str(&extra());
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn dashboard() -> Html<&'static str> {
    Html(DASHBOARD)
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not found")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openapi_document_is_json_and_covers_the_routes() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).expect("valid JSON");
        assert_eq!(doc["openapi"], "3.1.0");
        for path in [
            "/api/orders",
            "/api/orders/{id}",
            "/api/stores",
            "/api/events",
            "/healthz",
        ] {
            assert!(doc["paths"].get(path).is_some(), "{path} missing");
        }
    }

    #[test]
    fn list_query_names_the_parameter() {
        let q = |s: &[(&str, &str)]| {
            let pairs: Vec<(String, String)> = s
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect();
            parse_list_query(&pairs)
        };
        let f = q(&[("store_id", "s1"), ("status", "received"), ("limit", "5")]).expect("ok");
        assert_eq!(f.limit, 5);
        assert_eq!(f.status, Some(Status::Received));
        let f = q(&[("store_id", ""), ("status", ""), ("limit", "")]).expect("ok");
        assert_eq!(f, ListFilter::default());
        for (pairs, field) in [
            (vec![("limit", "0")], "limit"),
            (vec![("limit", "x")], "limit"),
            (vec![("status", "lost")], "status"),
            (vec![("store_id", "a b")], "store_id"),
            (vec![("colour", "red")], "colour"),
            (vec![("limit", "1"), ("limit", "2")], "limit"),
        ] {
            let e = q(&pairs).expect_err("rejected");
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
            assert!(
                e.message.starts_with(&format!("{field}: ")),
                "{}",
                e.message
            );
        }
    }
}
