//! `infer --serve`: an OpenAI-compatible HTTP server (`/v1/chat/completions`, `/v1/models`,
//! `/health`) over one base model with any number of LoRA adapters held in memory; a request's
//! `model` names the base or an adapter. Generation is the command line's (`infer::Session`):
//! the same template, stop tokens and sampler, so a request answers what `infer --adapter ...`
//! answers for the same prompt and seed.
//!
//! Requests wait their turn for the model in arrival order (a fair mutex); a client that goes
//! away stops its generation at the next token; SIGTERM/SIGINT stop accepting and let running
//! requests finish. Bad requests get OpenAI's error shape with a 4xx status.

use crate::chat::Message;
use crate::generate::{GenerationConfig, SamplingFlags};
use crate::infer::Session;
use crate::model::Lora;
use anyhow::{Context, Result};
use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

pub struct ServeOptions {
    /// `host:port` (port 0: any free port; the address is printed).
    pub addr: String,
    /// The name requests use for the base model.
    pub base_name: String,
    /// Adapters by the name requests use for them.
    pub adapters: Vec<(String, PathBuf)>,
    /// Decoding settings given on the command line (each request's own win).
    pub defaults: SamplingFlags,
    /// Requests that may wait for the model; more get 429.
    pub max_queue: usize,
}

/// The served model and what a request needs besides it.
struct Engine {
    session: std::sync::Mutex<Session>,
    /// Each adapter's LoRA branches, in the model's module order (`Llama::take_loras`).
    adapters: BTreeMap<String, Vec<Option<Lora>>>,
    base_name: String,
    gen_config: GenerationConfig,
    defaults: SamplingFlags,
    context: usize,
    /// Requests holding or awaiting the model.
    waiting: AtomicUsize,
    max_queue: usize,
    /// Serves requests in arrival order (tokio's mutex is fair).
    turn: tokio::sync::Mutex<()>,
}

/// An OpenAI-shaped error response.
struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<&'static str>,
    code: Option<&'static str>,
}

impl ApiError {
    fn bad(message: impl Into<String>, param: Option<&'static str>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param,
            code: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}});
        (self.status, Json(body)).into_response()
    }
}

/// A parsed, validated chat completion request.
struct ChatRequest {
    model: String,
    messages: Vec<Message>,
    flags: SamplingFlags,
    stop: Vec<String>,
    stream: bool,
    include_usage: bool,
}

fn parse_request(body: &Value, engine: &Engine) -> Result<ChatRequest, ApiError> {
    let obj = body
        .as_object()
        .ok_or_else(|| ApiError::bad("the request body must be a JSON object", None))?;
    let model = match obj.get("model") {
        None | Some(Value::Null) => engine.base_name.clone(),
        Some(Value::String(m)) => m.clone(),
        Some(_) => return Err(ApiError::bad("'model' must be a string", Some("model"))),
    };
    if model != engine.base_name && !engine.adapters.contains_key(&model) {
        return Err(ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!(
                "The model '{model}' does not exist (this server has: {})",
                std::iter::once(&engine.base_name)
                    .chain(engine.adapters.keys())
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            kind: "invalid_request_error",
            param: Some("model"),
            code: Some("model_not_found"),
        });
    }
    let list = obj
        .get("messages")
        .and_then(|m| m.as_array())
        .ok_or_else(|| ApiError::bad("'messages' must be a list", Some("messages")))?;
    if list.is_empty() {
        return Err(ApiError::bad(
            "'messages' must not be empty",
            Some("messages"),
        ));
    }
    let mut messages = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let role = m["role"].as_str().unwrap_or_default();
        let role = crate::data::formats::normalize_role(role).ok_or_else(|| {
            ApiError::bad(
                format!("messages[{i}].role: unknown role '{role}' (system, user, assistant)"),
                Some("messages"),
            )
        })?;
        let content = m["content"].as_str().ok_or_else(|| {
            ApiError::bad(
                format!("messages[{i}].content must be a string"),
                Some("messages"),
            )
        })?;
        messages.push(Message::new(role, content));
    }
    if messages.last().is_some_and(|m| m.role == "assistant") {
        return Err(ApiError::bad(
            "the last message must be from the user (or system), not the assistant",
            Some("messages"),
        ));
    }
    let num = |k: &'static str| -> Result<Option<f64>, ApiError> {
        match obj.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| ApiError::bad(format!("'{k}' must be a number"), Some(k))),
        }
    };
    let int = |k: &'static str| -> Result<Option<u64>, ApiError> {
        match obj.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                ApiError::bad(format!("'{k}' must be a non-negative integer"), Some(k))
            }),
        }
    };
    let temperature = num("temperature")?;
    if temperature.is_some_and(|t| !(0.0..=2.0).contains(&t)) {
        return Err(ApiError::bad(
            "'temperature' must be between 0 and 2",
            Some("temperature"),
        ));
    }
    let top_p = num("top_p")?;
    if top_p.is_some_and(|p| !(p > 0.0 && p <= 1.0)) {
        return Err(ApiError::bad("'top_p' must be in (0, 1]", Some("top_p")));
    }
    let max_tokens = int("max_completion_tokens")?.or(int("max_tokens")?);
    if max_tokens == Some(0) {
        return Err(ApiError::bad(
            "'max_tokens' must be at least 1",
            Some("max_tokens"),
        ));
    }
    let stop = match obj.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) if a.len() <= 4 => a
            .iter()
            .map(|x| x.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                ApiError::bad("'stop' must be a string or up to 4 strings", Some("stop"))
            })?,
        Some(_) => {
            return Err(ApiError::bad(
                "'stop' must be a string or up to 4 strings",
                Some("stop"),
            ))
        }
    };
    let stream = obj.get("stream").and_then(|v| v.as_bool()).unwrap_or(false);
    let include_usage = body["stream_options"]["include_usage"]
        .as_bool()
        .unwrap_or(false);
    let d = &engine.defaults;
    let flags = SamplingFlags {
        do_sample: temperature.map(|t| t > 0.0).or(d.do_sample),
        temperature: temperature.or(d.temperature),
        top_p: top_p.or(d.top_p),
        top_k: d.top_k,
        repetition_penalty: d.repetition_penalty,
        max_new_tokens: max_tokens.map(|m| m as usize).or(d.max_new_tokens),
        seed: int("seed")?.unwrap_or(d.seed),
        no_cache: d.no_cache,
    };
    Ok(ChatRequest {
        model,
        messages,
        flags,
        stop,
        stream,
        include_usage,
    })
}

/// Sets a flag when dropped: the request's future or stream is dropped when its client goes
/// away, and the generation sees the flag at its next token.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// What a finished generation reports.
struct Finished {
    text: String,
    prompt_tokens: usize,
    completion_tokens: usize,
    finish_reason: &'static str,
}

impl Engine {
    /// Generates the reply (blocking; call on a blocking thread while holding the turn).
    /// `on_text` gets new text as it is final (not part of a possible stop string).
    fn generate(
        &self,
        req: &ChatRequest,
        cancel: &AtomicBool,
        mut on_text: impl FnMut(&str) -> bool,
    ) -> Result<Finished, ApiError> {
        let internal = |e: anyhow::Error| ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: format!("{e:#}"),
            kind: "server_error",
            param: None,
            code: None,
        };
        let mut s = self.session.lock().unwrap_or_else(|p| p.into_inner());
        let prompt = s.prompt_ids(&req.messages).map_err(internal)?;
        let (params, _) = req.flags.resolve(&self.gen_config, false);
        if prompt.len() + params.max_new_tokens > self.context {
            return Err(ApiError {
                status: StatusCode::BAD_REQUEST,
                message: format!(
                    "This model's maximum context length is {} tokens; the messages are {} tokens and max_tokens is {}",
                    self.context,
                    prompt.len(),
                    params.max_new_tokens
                ),
                kind: "invalid_request_error",
                param: Some("messages"),
                code: Some("context_length_exceeded"),
            });
        }
        if req.model != self.base_name {
            s.model.put_loras(self.adapters[&req.model].clone());
        }
        s.params = params;
        let mut text = String::new();
        let mut sent = 0usize;
        let stopped = std::cell::Cell::new(false);
        let result = s.reply_until(
            &req.messages,
            |piece| {
                if stopped.get() || cancel.load(Ordering::SeqCst) {
                    return;
                }
                text.push_str(piece);
                if let Some(pos) = req
                    .stop
                    .iter()
                    .filter_map(|st| text.find(st.as_str()))
                    .min()
                {
                    text.truncate(pos);
                    stopped.set(true);
                }
                // hold back what could still become a stop string
                let hold = req
                    .stop
                    .iter()
                    .map(|st| {
                        (1..st.len())
                            .rev()
                            .find(|&k| text.ends_with(&st[..k]))
                            .unwrap_or(0)
                    })
                    .max()
                    .unwrap_or(0);
                let upto = if stopped.get() {
                    text.len()
                } else {
                    text.len() - hold
                };
                if upto > sent && text.is_char_boundary(upto) && !on_text(&text[sent..upto]) {
                    cancel.store(true, Ordering::SeqCst);
                }
                sent = sent.max(upto);
            },
            || stopped.get() || cancel.load(Ordering::SeqCst),
        );
        s.model.take_loras();
        let (_, g) = result.map_err(internal)?;
        let by_string = stopped.get();
        if !by_string && sent < text.len() {
            on_text(&text[sent..]);
        }
        Ok(Finished {
            // as generated (what the stream sent), not trimmed as the command line prints it
            text,
            prompt_tokens: g.prompt_tokens,
            completion_tokens: g.ids.len(),
            finish_reason: if g.stopped || by_string {
                "stop"
            } else {
                "length"
            },
        })
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn completion_id() -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!("chatcmpl-{}-{}", now(), N.fetch_add(1, Ordering::SeqCst))
}

async fn chat_completions(
    State(engine): State<Arc<Engine>>,
    body: Result<Json<Value>, JsonRejection>,
) -> Response {
    let Json(body) = match body {
        Ok(b) => b,
        Err(e) => {
            return ApiError::bad(format!("invalid JSON body: {}", e.body_text()), None)
                .into_response()
        }
    };
    let req = match parse_request(&body, &engine) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    if engine.waiting.fetch_add(1, Ordering::SeqCst) >= engine.max_queue {
        engine.waiting.fetch_sub(1, Ordering::SeqCst);
        return ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: format!(
                "{} requests are already waiting; try again later",
                engine.max_queue
            ),
            kind: "server_error",
            param: None,
            code: Some("server_overloaded"),
        }
        .into_response();
    }
    let id = completion_id();
    let created = now();
    let cancel = Arc::new(AtomicBool::new(false));
    let guard = CancelOnDrop(cancel.clone());
    if !req.stream {
        let turn = engine.turn.lock().await;
        let e2 = engine.clone();
        let c2 = cancel.clone();
        let done = tokio::task::spawn_blocking(move || {
            let r = e2.generate(&req, &c2, |_| true);
            (req.model, r)
        })
        .await;
        drop(turn);
        engine.waiting.fetch_sub(1, Ordering::SeqCst);
        drop(guard);
        let (model, r) = match done {
            Ok(x) => x,
            Err(e) => {
                return ApiError {
                    status: StatusCode::INTERNAL_SERVER_ERROR,
                    message: e.to_string(),
                    kind: "server_error",
                    param: None,
                    code: None,
                }
                .into_response()
            }
        };
        return match r {
            Ok(f) => Json(json!({
                "id": id, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": f.text},
                             "finish_reason": f.finish_reason, "logprobs": null}],
                "usage": {"prompt_tokens": f.prompt_tokens, "completion_tokens": f.completion_tokens,
                          "total_tokens": f.prompt_tokens + f.completion_tokens},
            }))
            .into_response(),
            Err(e) => e.into_response(),
        };
    }
    // streaming: chunks as server-sent events, then [DONE]
    let (tx, rx) = tokio::sync::mpsc::channel::<Event>(64);
    let model = req.model.clone();
    let chunk = move |delta: Value, finish: Option<&str>| -> Event {
        Event::default().data(
            json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null}]})
            .to_string(),
        )
    };
    let e2 = engine.clone();
    tokio::spawn(async move {
        let turn = e2.turn.lock().await;
        let e3 = e2.clone();
        let tx2 = tx.clone();
        let c2 = cancel.clone();
        let include_usage = req.include_usage;
        let r = tokio::task::spawn_blocking(move || {
            let first = chunk(json!({"role": "assistant", "content": ""}), None);
            let mut open = tx2.blocking_send(first).is_ok();
            let r = e3.generate(&req, &c2, |piece| {
                open = open && tx2.blocking_send(chunk(json!({"content": piece}), None)).is_ok();
                open
            });
            match r {
                Ok(f) => {
                    let _ = tx2.blocking_send(chunk(json!({}), Some(f.finish_reason)));
                    if include_usage {
                        let usage = json!({"prompt_tokens": f.prompt_tokens, "completion_tokens": f.completion_tokens,
                                           "total_tokens": f.prompt_tokens + f.completion_tokens});
                        let _ = tx2.blocking_send(Event::default().data(json!({"object": "chat.completion.chunk", "choices": [], "usage": usage}).to_string()));
                    }
                }
                Err(e) => {
                    let _ = tx2.blocking_send(Event::default().data(json!({"error": {"message": e.message, "type": e.kind}}).to_string()));
                }
            }
            let _ = tx2.blocking_send(Event::default().data("[DONE]"));
        })
        .await;
        drop(turn);
        e2.waiting.fetch_sub(1, Ordering::SeqCst);
        drop(r);
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    let stream = futures_util::StreamExt::map(stream, move |e| {
        let _keep = &guard; // dropped with the stream when the client goes away
        Ok::<_, std::convert::Infallible>(e)
    });
    Sse::new(stream).into_response()
}

async fn models(State(engine): State<Arc<Engine>>) -> Json<Value> {
    let data: Vec<Value> = std::iter::once(&engine.base_name)
        .chain(engine.adapters.keys())
        .map(|m| json!({"id": m, "object": "model", "created": 0, "owned_by": "dialora"}))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {},
        _ = tokio::signal::ctrl_c() => {},
    }
    eprintln!("infer: shutting down: finishing running requests");
}

/// Serves `session` (its model without an adapter) and the named adapters until SIGTERM or
/// SIGINT; `ready` is called with the bound address once it accepts connections.
pub fn serve(
    mut session: Session,
    o: ServeOptions,
    ready: impl FnOnce(std::net::SocketAddr),
) -> Result<()> {
    let mut adapters = BTreeMap::new();
    for (name, dir) in &o.adapters {
        let a = crate::lora::Adapter::load(dir, session.model.dtype, &session.model.device)?;
        let base = PathBuf::from(&o.base_name);
        session.model.attach_adapter(&a, &base)?;
        adapters.insert(name.clone(), session.model.take_loras());
    }
    let context = session.model.config.max_position_embeddings;
    let gen_config = session.gen_config.clone();
    let engine = Arc::new(Engine {
        session: std::sync::Mutex::new(session),
        adapters,
        base_name: o.base_name.clone(),
        gen_config,
        defaults: o.defaults.clone(),
        context,
        waiting: AtomicUsize::new(0),
        max_queue: o.max_queue,
        turn: tokio::sync::Mutex::new(()),
    });
    let app = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .with_state(engine)
        // a bug must cost one request a 500, never the server or a silent drop
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(|_| {
            ApiError {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                message: "internal error while answering this request".into(),
                kind: "server_error",
                param: None,
                code: None,
            }
            .into_response()
        }));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the server runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&o.addr)
            .await
            .with_context(|| format!("cannot listen on {}", o.addr))?;
        ready(listener.local_addr()?);
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown_signal())
            .await
            .context("server error")
    })
}
