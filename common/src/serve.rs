//! `infer --serve`: an OpenAI-compatible HTTP server (`/v1/chat/completions`, `/v1/models`,
//! `/health`, `/metrics`) over one base model with any number of LoRA adapters held in memory;
//! a request's `model` names the base or an adapter. Generation is the engine's
//! (`engine::Engine`), the one the command line uses: the same template, stop tokens and
//! sampler, so a request answers what `infer --adapter ...` answers for the same prompt and
//! seed, whatever other requests share the batch.
//!
//! Requests for any mix of adapters run together in one batch (continuous batching: a request
//! joins at the next step, leaves when done). A request is checked (its template, its length)
//! before it queues; beyond `--max-queue` waiting ones it gets 429. A client that goes away
//! cancels its request at the next step, queued, prefilling or decoding. SIGTERM/SIGINT stop
//! accepting and let running requests finish. Every error is OpenAI's JSON error object with
//! its status (4xx for what the client sent, 500 for the server's own failures). With an API
//! key, every route but `/health` and `/metrics` asks for `Authorization: Bearer KEY`.

use crate::chat::Message;
use crate::engine::{Event, Finished, Refused, TokenLogprob};
use crate::generate::{GenerationConfig, SamplingFlags};
use crate::infer::Session;
use anyhow::{Context, Result};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// The largest request body accepted (413 beyond): far more than a full context of text.
pub const MAX_BODY_BYTES: usize = 2 * 1024 * 1024;

pub struct ServeOptions {
    /// `host:port` (port 0: any free port; the address is printed).
    pub addr: String,
    /// The name requests use for the base model.
    pub base_name: String,
    /// Decoding settings given on the command line (each request's own win).
    pub defaults: SamplingFlags,
    /// When set, every request but `/health` and `/metrics` must carry `Authorization: Bearer KEY`.
    pub api_key: Option<String>,
}

/// The served session and what a request needs besides it.
struct Server {
    /// The engine (with every adapter), tokenizer and template.
    session: Session,
    base_name: String,
    gen_config: GenerationConfig,
    defaults: SamplingFlags,
    /// SHA-256 of the API key, compared in constant time.
    api_key: Option<[u8; 32]>,
}

/// An OpenAI-shaped error response.
#[derive(Debug)]
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

    fn status(status: StatusCode, message: impl Into<String>, code: Option<&'static str>) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind: if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
                "server_error"
            } else {
                "invalid_request_error"
            },
            param: None,
            code,
        }
    }

    fn internal(e: impl std::fmt::Display) -> Self {
        Self::status(StatusCode::INTERNAL_SERVER_ERROR, e.to_string(), None)
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
    /// The rendered, tokenized prompt and the resolved decoding (`Engine::check_prompt`).
    prompt: Vec<u32>,
    params: crate::generate::SamplingParams,
    flags: SamplingFlags,
    stop: Vec<String>,
    stream: bool,
    include_usage: bool,
    /// `top_logprobs` when `logprobs` is true.
    logprobs: Option<usize>,
    presence_penalty: f32,
    frequency_penalty: f32,
    /// vLLM's extra parameter (also llama-server's): eos and end-of-turn tokens do not end it.
    ignore_eos: bool,
}

/// The JSON body of a POST: a JSON content type (or none), at most `MAX_BODY_BYTES`, valid JSON.
fn json_body(headers: &HeaderMap, body: Result<Bytes, BytesRejection>) -> Result<Value, ApiError> {
    if let Some(ct) = headers.get(header::CONTENT_TYPE) {
        let ct = ct.to_str().unwrap_or_default().to_ascii_lowercase();
        let mime = ct.split(';').next().unwrap_or_default().trim();
        let json = mime == "application/json"
            || (mime.starts_with("application/") && mime.ends_with("+json"));
        if !json {
            return Err(ApiError::status(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("unsupported content type '{mime}': send the request as application/json"),
                None,
            ));
        }
    }
    let bytes = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::status(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the request body is larger than this server's limit of {MAX_BODY_BYTES} bytes"
                ),
                None,
            )
        } else {
            ApiError::bad(
                format!("cannot read the request body: {}", e.body_text()),
                None,
            )
        }
    })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad(format!("invalid JSON body: {e}"), None))
}

/// A message's text: a string, or OpenAI's list of content parts of type `text`.
fn message_text(v: &Value, i: usize) -> Result<String, ApiError> {
    let bad = |what: &str| ApiError::bad(format!("messages[{i}].content {what}"), Some("messages"));
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => {
            let mut text = String::new();
            for (j, p) in parts.iter().enumerate() {
                match (p["type"].as_str(), p["text"].as_str()) {
                    (Some("text"), Some(t)) => text.push_str(t),
                    (Some("text"), None) => {
                        return Err(bad(&format!("[{j}].text must be a string")))
                    }
                    (Some(other), _) => {
                        return Err(bad(&format!(
                            "[{j}]: content of type '{other}' is not supported (only text)"
                        )))
                    }
                    (None, _) => {
                        return Err(bad(&format!("[{j}] must be an object with a 'type'")))
                    }
                }
            }
            Ok(text)
        }
        Value::Null => Err(bad("is missing")),
        _ => Err(bad("must be a string or a list of text parts")),
    }
}

fn parse_request(body: &Value, engine: &Server) -> Result<ChatRequest, ApiError> {
    let obj = body
        .as_object()
        .ok_or_else(|| ApiError::bad("the request body must be a JSON object", None))?;
    let model = match obj.get("model") {
        None | Some(Value::Null) => engine.base_name.clone(),
        Some(Value::String(m)) => m.clone(),
        Some(_) => return Err(ApiError::bad("'model' must be a string", Some("model"))),
    };
    if model != engine.base_name && !engine.session.engine.has_adapter(&model) {
        return Err(ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!(
                "The model '{model}' does not exist (this server has: {})",
                std::iter::once(&engine.base_name)
                    .chain(engine.session.engine.adapters())
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
        let bad = |what: String| ApiError::bad(format!("messages[{i}]{what}"), Some("messages"));
        let Some(m) = m.as_object() else {
            return Err(bad(" must be an object with 'role' and 'content'".into()));
        };
        let role = match m.get("role") {
            Some(Value::String(r)) => r.as_str(),
            None => return Err(bad(".role is missing".into())),
            Some(_) => return Err(bad(".role must be a string".into())),
        };
        let role = crate::data::formats::normalize_role(role).ok_or_else(|| {
            bad(format!(
                ".role: unknown role '{role}' (system, user, assistant)"
            ))
        })?;
        let content = message_text(m.get("content").unwrap_or(&Value::Null), i)?;
        messages.push(Message::new(role, &content));
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
    let boolean = |k: &'static str, within: Option<&Value>| -> Result<Option<bool>, ApiError> {
        match within.unwrap_or(body).get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(ApiError::bad(
                format!("'{k}' must be true or false"),
                Some(k),
            )),
        }
    };
    // what this server does not do is refused, never silently ignored
    if int("n")?.is_some_and(|n| n != 1) {
        return Err(ApiError::bad(
            "'n' must be 1: this server returns one choice per request",
            Some("n"),
        ));
    }
    let top_logprobs = int("top_logprobs")?;
    if top_logprobs.is_some_and(|n| n > 20) {
        return Err(ApiError::bad(
            "'top_logprobs' must be between 0 and 20",
            Some("top_logprobs"),
        ));
    }
    let logprobs = match boolean("logprobs", None)? {
        Some(true) => Some(top_logprobs.unwrap_or(0) as usize),
        _ if top_logprobs.is_some_and(|n| n > 0) => {
            return Err(ApiError::bad(
                "'top_logprobs' needs 'logprobs' to be true",
                Some("top_logprobs"),
            ))
        }
        _ => None,
    };
    let penalty = |k: &'static str| -> Result<f32, ApiError> {
        let v = num(k)?.unwrap_or(0.0);
        if !(-2.0..=2.0).contains(&v) {
            return Err(ApiError::bad(
                format!("'{k}' must be between -2 and 2"),
                Some(k),
            ));
        }
        Ok(v as f32)
    };
    let presence_penalty = penalty("presence_penalty")?;
    let frequency_penalty = penalty("frequency_penalty")?;
    if obj.get("tools").is_some_and(|t| !t.is_null()) {
        return Err(ApiError::bad(
            "'tools' are not supported by this server",
            Some("tools"),
        ));
    }
    let temperature = num("temperature")?;
    if temperature.is_some_and(|t| !(0.0..=2.0).contains(&t)) {
        return Err(ApiError::bad(
            "'temperature' must be between 0 and 2",
            Some("temperature"),
        ));
    }
    let top_p = num("top_p")?;
    if let Some(p) = top_p {
        crate::generate::check_top_p(p)
            .map_err(|e| ApiError::bad(format!("'top_p' {e}"), Some("top_p")))?;
    }
    let max_tokens = int("max_completion_tokens")?.or(int("max_tokens")?);
    if max_tokens == Some(0) {
        return Err(ApiError::bad(
            "'max_tokens' must be at least 1",
            Some("max_tokens"),
        ));
    }
    let stop_error = || ApiError::bad("'stop' must be a string or up to 4 strings", Some("stop"));
    let stop = match obj.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) if a.len() <= 4 => a
            .iter()
            .map(|x| x.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(stop_error)?,
        Some(_) => return Err(stop_error()),
    };
    let stop: Vec<String> = stop.into_iter().filter(|s| !s.is_empty()).collect();
    let stream = boolean("stream", None)?.unwrap_or(false);
    let ignore_eos = boolean("ignore_eos", None)?.unwrap_or(false);
    let include_usage = match obj.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(o @ Value::Object(_)) => boolean("include_usage", Some(o))?.unwrap_or(false),
        Some(_) => {
            return Err(ApiError::bad(
                "'stream_options' must be an object",
                Some("stream_options"),
            ))
        }
    };
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
        prompt: Vec::new(),
        params: Default::default(),
        flags,
        stop,
        stream,
        include_usage,
        logprobs,
        presence_penalty,
        frequency_penalty,
        ignore_eos,
    })
}

impl Server {
    /// Renders and tokenizes the prompt and checks it fits the context: what is wrong with a
    /// request is answered before it queues (and before a stream starts).
    fn check_prompt(&self, req: &mut ChatRequest) -> Result<(), ApiError> {
        let s = &self.session;
        // the template's own complaints (raise_exception) are about the request
        let prompt = crate::infer::prompt_ids(&s.template, &s.tok, &req.messages)
            .map_err(|e| ApiError::bad(crate::cli::error_line(&e), Some("messages")))?;
        let (params, _) = req.flags.resolve(&self.gen_config, false);
        let context = s.engine.context();
        if prompt.len() + params.max_new_tokens > context {
            return Err(ApiError {
                status: StatusCode::BAD_REQUEST,
                message: format!(
                    "This model's maximum context length is {context} tokens; the messages are {} tokens and max_tokens is {}",
                    prompt.len(),
                    params.max_new_tokens
                ),
                kind: "invalid_request_error",
                param: Some("messages"),
                code: Some("context_length_exceeded"),
            });
        }
        req.prompt = prompt;
        req.params = params;
        Ok(())
    }

    /// Queues a checked request; its events come on the returned channel (dropping it cancels
    /// the request).
    fn submit(
        &self,
        req: &ChatRequest,
    ) -> Result<tokio::sync::mpsc::UnboundedReceiver<Event>, ApiError> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let mut r = crate::engine::Request::new(
            req.prompt.clone(),
            (req.model != self.base_name).then(|| req.model.clone()),
            req.params.clone(),
        );
        r.stop = req.stop.clone();
        r.logprobs = req.logprobs;
        r.presence_penalty = req.presence_penalty;
        r.frequency_penalty = req.frequency_penalty;
        r.ignore_eos = req.ignore_eos;
        match self.session.engine.submit(r, Box::new(tx)) {
            Ok(()) => Ok(rx),
            Err(Refused::Full(n)) => Err(ApiError::status(
                StatusCode::TOO_MANY_REQUESTS,
                format!("{n} requests are already waiting; try again later"),
                Some("server_overloaded"),
            )),
            Err(e @ (Refused::TooLong { .. } | Refused::EmptyPrompt)) => {
                Err(ApiError::bad(e.to_string(), Some("messages")))
            }
            Err(e) => Err(ApiError::internal(e)),
        }
    }
}

/// OpenAI's `logprobs.content` entries of some tokens.
fn logprobs_json(l: &[TokenLogprob]) -> Value {
    let entry = |token: &str, logprob: f32| json!({"token": token, "logprob": logprob, "bytes": token.as_bytes()});
    Value::Array(
        l.iter()
            .map(|t| {
                let mut e = entry(&t.token, t.logprob);
                e["top_logprobs"] =
                    Value::Array(t.top.iter().map(|(_, s, lp)| entry(s, *lp)).collect());
                e
            })
            .collect(),
    )
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

fn usage(f: &Finished) -> Value {
    json!({"prompt_tokens": f.prompt_tokens, "completion_tokens": f.completion_tokens,
           "total_tokens": f.prompt_tokens + f.completion_tokens,
           "prompt_tokens_details": {"cached_tokens": f.cached_tokens}})
}

fn error_json(message: &str) -> Value {
    json!({"error": {"message": message, "type": "server_error", "param": null, "code": null}})
}

async fn chat_completions(
    State(server): State<Arc<Server>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let req = match json_body(&headers, body).and_then(|b| parse_request(&b, &server)) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let s2 = server.clone();
    let checked = tokio::task::spawn_blocking(move || {
        let mut req = req;
        s2.check_prompt(&mut req).map(|_| req)
    })
    .await;
    let req = match checked {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return e.into_response(),
        Err(e) => return ApiError::internal(e).into_response(),
    };
    let mut rx = match server.submit(&req) {
        Ok(rx) => rx,
        Err(e) => return e.into_response(),
    };
    let id = completion_id();
    let created = now();
    let want_logprobs = req.logprobs.is_some();
    if !req.stream {
        // a client that leaves drops this future and the receiver with it: cancelled
        let (mut text, mut logprobs) = (String::new(), Vec::new());
        while let Some(e) = rx.recv().await {
            match e {
                Event::Delta {
                    text: t,
                    logprobs: l,
                } => {
                    text.push_str(&t);
                    logprobs.extend(l);
                }
                Event::Done(f) => {
                    let lp = if want_logprobs {
                        json!({"content": logprobs_json(&logprobs)})
                    } else {
                        Value::Null
                    };
                    return Json(json!({
                        "id": id, "object": "chat.completion", "created": created, "model": req.model,
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                     "finish_reason": f.finish.reason(), "logprobs": lp}],
                        "usage": usage(&f),
                    }))
                    .into_response();
                }
                Event::Error(e) => return ApiError::internal(e).into_response(),
            }
        }
        return ApiError::internal("the generation engine stopped").into_response();
    }
    // streaming: chunks as server-sent events, then [DONE]
    let (tx, sse) = tokio::sync::mpsc::channel::<SseEvent>(64);
    let model = req.model.clone();
    let include_usage = req.include_usage;
    tokio::spawn(async move {
        let chunk = |delta: Value, finish: Option<&str>, logprobs: Value| -> SseEvent {
            SseEvent::default().data(
                json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": logprobs}]})
                .to_string(),
            )
        };
        let send = |e: SseEvent| tx.send(e);
        if send(chunk(
            json!({"role": "assistant", "content": ""}),
            None,
            Value::Null,
        ))
        .await
        .is_err()
        {
            return;
        }
        loop {
            // the client going away drops the SSE stream: stop listening, which cancels
            let e = tokio::select! {
                e = rx.recv() => e,
                _ = tx.closed() => return,
            };
            let out = match e {
                Some(Event::Delta { text, logprobs }) => {
                    let lp = if want_logprobs {
                        json!({"content": logprobs_json(&logprobs)})
                    } else {
                        Value::Null
                    };
                    chunk(json!({"content": text}), None, lp)
                }
                Some(Event::Done(f)) => {
                    if send(chunk(json!({}), Some(f.finish.reason()), Value::Null))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    if include_usage {
                        let u = json!({"id": id, "object": "chat.completion.chunk", "created": created,
                                       "model": model, "choices": [], "usage": usage(&f)});
                        let _ = send(SseEvent::default().data(u.to_string())).await;
                    }
                    break;
                }
                Some(Event::Error(e)) => {
                    let _ = send(SseEvent::default().data(error_json(&e).to_string())).await;
                    break;
                }
                None => {
                    let _ = send(
                        SseEvent::default()
                            .data(error_json("the generation engine stopped").to_string()),
                    )
                    .await;
                    break;
                }
            };
            if send(out).await.is_err() {
                return;
            }
        }
        let _ = send(SseEvent::default().data("[DONE]")).await;
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(sse);
    let stream = futures_util::StreamExt::map(stream, Ok::<_, std::convert::Infallible>);
    Sse::new(stream).into_response()
}

async fn models(State(engine): State<Arc<Server>>) -> Json<Value> {
    let data: Vec<Value> = std::iter::once(&engine.base_name)
        .chain(engine.session.engine.adapters())
        .map(|m| json!({"id": m, "object": "model", "created": 0, "owned_by": "dialora"}))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

/// 200 while the server takes work; 503 when a new request would be refused (queue full).
async fn health(State(server): State<Arc<Server>>) -> Response {
    let e = &server.session.engine;
    let (waiting, running, max_queue) = (e.waiting(), e.running(), e.options().max_queue);
    let body = |status: &str| {
        json!({"status": status, "waiting": waiting, "running": running,
               "max_batch": e.options().max_batch, "max_queue": max_queue})
    };
    if waiting >= max_queue {
        (StatusCode::SERVICE_UNAVAILABLE, Json(body("full"))).into_response()
    } else {
        Json(body("ok")).into_response()
    }
}

/// The engine's metrics in Prometheus' text format.
async fn metrics(State(server): State<Arc<Server>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        server.session.engine.metrics_text(),
    )
        .into_response()
}

async fn not_found(req: Request) -> ApiError {
    ApiError::status(
        StatusCode::NOT_FOUND,
        format!(
            "no route {} {} (this server has POST /v1/chat/completions, GET /v1/models, GET /health, GET /metrics)",
            req.method(),
            req.uri().path()
        ),
        None,
    )
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::status(
        StatusCode::METHOD_NOT_ALLOWED,
        format!(
            "method {} is not allowed on {}",
            req.method(),
            req.uri().path()
        ),
        None,
    )
}

/// With an API key: `Authorization: Bearer KEY`, else OpenAI's 401.
async fn authorize(State(engine): State<Arc<Server>>, req: Request, next: Next) -> Response {
    use sha2::{Digest, Sha256};
    use subtle::ConstantTimeEq;
    if let Some(want) = &engine.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|k| Sha256::digest(k.trim().as_bytes()));
        let ok = given.is_some_and(|g| bool::from(g.as_slice().ct_eq(want)));
        if !ok {
            return ApiError {
                status: StatusCode::UNAUTHORIZED,
                message: "Incorrect or missing API key: send it as 'Authorization: Bearer KEY'"
                    .into(),
                kind: "invalid_request_error",
                param: None,
                code: Some("invalid_api_key"),
            }
            .into_response();
        }
    }
    next.run(req).await
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

/// Serves `session` (the base model and its engine's adapters) until SIGTERM or SIGINT;
/// `ready` is called with the bound address once it accepts connections.
pub fn serve(
    session: Session,
    o: ServeOptions,
    ready: impl FnOnce(std::net::SocketAddr),
) -> Result<()> {
    let gen_config = session.gen_config.clone();
    let api_key = o.api_key.as_ref().map(|k| {
        use sha2::Digest;
        sha2::Sha256::digest(k.trim().as_bytes()).into()
    });
    let server = Arc::new(Server {
        session,
        base_name: o.base_name.clone(),
        gen_config,
        defaults: o.defaults.clone(),
        api_key,
    });
    let api = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            server.clone(),
            authorize,
        ));
    let app = Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .method_not_allowed_fallback(method_not_allowed)
        .merge(api)
        .with_state(server.clone())
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        // a bug must cost one request a 500, never the server or a silent drop
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(|_| {
            ApiError::internal("internal error while answering this request").into_response()
        }));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the server runtime")?;
    let served = rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&o.addr)
            .await
            .with_context(|| format!("cannot listen on {}", o.addr))?;
        ready(listener.local_addr()?);
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown_signal())
            .await
            .context("server error")
    });
    drop(rt);
    // the engine stops once its last requests have ended
    drop(server);
    served
}
