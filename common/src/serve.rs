//! `infer --serve`: an OpenAI-compatible HTTP server (`/v1/chat/completions`, `/v1/models`,
//! `/health`) over one base model with any number of LoRA adapters held in memory; a request's
//! `model` names the base or an adapter. Generation is the command line's (`infer::Session`):
//! the same template, stop tokens and sampler, so a request answers what `infer --adapter ...`
//! answers for the same prompt and seed.
//!
//! Requests wait their turn for the model in arrival order (a fair mutex). A request's place in
//! the queue and its turn are guards: whatever ends it (an answer, an error, a panic, a client
//! that goes away while queued, prefilling or decoding) gives them back. A client that goes
//! away stops its generation at the next prefill chunk or token; SIGTERM/SIGINT stop accepting
//! and let running requests finish. Every error is OpenAI's JSON error object with its status
//! (4xx for what the client sent, 500 for the server's own failures). With an API key, every
//! route but `/health` asks for `Authorization: Bearer KEY`.

use crate::chat::Message;
use crate::generate::{GenerationConfig, SamplingFlags};
use crate::infer::Session;
use crate::model::Lora;
use anyhow::{Context, Result};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

/// The largest request body accepted (413 beyond): far more than a full context of text.
pub const MAX_BODY_BYTES: usize = 2 * 1024 * 1024;

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
    /// When set, every request but `/health` must carry `Authorization: Bearer KEY`.
    pub api_key: Option<String>,
}

/// The served model and what a request needs besides it.
struct Engine {
    session: std::sync::Mutex<Session>,
    /// The session's chat template and tokenizer, to check a request before it waits its turn.
    template: crate::chat::ChatTemplate,
    tok: tokenizers::Tokenizer,
    /// Each adapter's LoRA branches, in the model's module order (`Llama::take_loras`).
    adapters: BTreeMap<String, Vec<Option<Lora>>>,
    base_name: String,
    gen_config: GenerationConfig,
    defaults: SamplingFlags,
    context: usize,
    /// Requests holding or awaiting the model (each counted by a `QueueSlot`).
    waiting: AtomicUsize,
    max_queue: usize,
    /// Serves requests in arrival order (tokio's mutex is fair).
    turn: Arc<tokio::sync::Mutex<()>>,
    /// SHA-256 of the API key, compared in constant time.
    api_key: Option<[u8; 32]>,
}

/// A request's place among the `waiting` ones, given back when dropped, on every path.
struct QueueSlot(Arc<Engine>);

impl QueueSlot {
    fn take(engine: &Arc<Engine>) -> Option<QueueSlot> {
        engine
            .waiting
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < engine.max_queue).then_some(n + 1)
            })
            .ok()
            .map(|_| QueueSlot(engine.clone()))
    }
}

impl Drop for QueueSlot {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::SeqCst);
    }
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
    if boolean("logprobs", None)? == Some(true) || int("top_logprobs")?.is_some_and(|n| n > 0) {
        return Err(ApiError::bad(
            "'logprobs' is not supported by this server",
            Some("logprobs"),
        ));
    }
    for k in ["presence_penalty", "frequency_penalty"] {
        if num(k)?.is_some_and(|x| x != 0.0) {
            return Err(ApiError::bad(
                format!("'{k}' is not supported by this server (only 0)"),
                Some(k),
            ));
        }
    }
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
    })
}

/// Sets a flag when dropped: the request's future or stream is dropped when its client goes
/// away, and the generation sees the flag at its next prefill chunk or token.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// The session with an adapter's LoRA branches put in; they are taken out again when this is
/// dropped, whatever ended the request (an error or a panic included), so no request ever
/// leaves an adapter behind for the next one.
struct WithAdapter<'a>(&'a mut Session);

impl<'a> WithAdapter<'a> {
    fn new(s: &'a mut Session, loras: Option<&Vec<Option<Lora>>>) -> Self {
        s.model.take_loras();
        if let Some(l) = loras {
            s.model.put_loras(l.clone());
        }
        WithAdapter(s)
    }
}

impl Drop for WithAdapter<'_> {
    fn drop(&mut self) {
        self.0.model.take_loras();
    }
}

/// How many bytes at the end of `text` could still be the start of one of the `stops`: held
/// back from the stream until the next piece decides. Cut on character boundaries.
fn stop_prefix_len(text: &str, stops: &[String]) -> usize {
    stops
        .iter()
        .map(|st| {
            (1..st.len())
                .rev()
                .filter(|&k| st.is_char_boundary(k))
                .find(|&k| text.ends_with(&st[..k]))
                .unwrap_or(0)
        })
        .max()
        .unwrap_or(0)
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
    /// Renders and tokenizes the prompt and checks it fits the context: what is wrong with a
    /// request is answered before it waits its turn (and before a stream starts).
    fn check_prompt(&self, req: &mut ChatRequest) -> Result<(), ApiError> {
        // the template's own complaints (raise_exception) are about the request
        let prompt = crate::infer::prompt_ids(&self.template, &self.tok, &req.messages)
            .map_err(|e| ApiError::bad(crate::cli::error_line(&e), Some("messages")))?;
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
        req.prompt = prompt;
        req.params = params;
        Ok(())
    }

    /// Generates the reply (blocking; call on a blocking thread while holding the turn).
    /// `on_text` gets new text as it is final (not part of a possible stop string).
    fn generate(
        &self,
        req: &ChatRequest,
        cancel: &AtomicBool,
        mut on_text: impl FnMut(&str) -> bool,
    ) -> Result<Finished, ApiError> {
        let mut guard = self.session.lock().unwrap_or_else(|p| p.into_inner());
        let s = WithAdapter::new(&mut guard, self.adapters.get(&req.model));
        s.0.params = req.params.clone();
        let mut text = String::new();
        let mut sent = 0usize;
        let stopped = std::cell::Cell::new(false);
        let (_, g) =
            s.0.reply_to_ids(
                &req.prompt,
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
                    let upto = if stopped.get() {
                        text.len()
                    } else {
                        text.len() - stop_prefix_len(&text, &req.stop)
                    };
                    if upto > sent && !on_text(&text[sent..upto]) {
                        cancel.store(true, Ordering::SeqCst);
                    }
                    sent = sent.max(upto);
                },
                || stopped.get() || cancel.load(Ordering::SeqCst),
            )
            .map_err(|e| ApiError::internal(crate::cli::error_line(&e)))?;
        drop(s);
        if g.prefilled < g.prompt_tokens {
            eprintln!(
                "infer: a client went away: its prompt was stopped after {} of {} tokens",
                g.prefilled, g.prompt_tokens
            );
        } else if cancel.load(Ordering::SeqCst) {
            eprintln!(
                "infer: a client went away: stopped after {} of at most {} tokens",
                g.ids.len(),
                req.flags.max_new_tokens.unwrap_or(0).max(g.ids.len())
            );
        }
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

fn usage(f: &Finished) -> Value {
    json!({"prompt_tokens": f.prompt_tokens, "completion_tokens": f.completion_tokens,
           "total_tokens": f.prompt_tokens + f.completion_tokens})
}

async fn chat_completions(
    State(engine): State<Arc<Engine>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let req = match json_body(&headers, body).and_then(|b| parse_request(&b, &engine)) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let e2 = engine.clone();
    let checked = tokio::task::spawn_blocking(move || {
        let mut req = req;
        e2.check_prompt(&mut req).map(|_| req)
    })
    .await;
    let req = match checked {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return e.into_response(),
        Err(e) => return ApiError::internal(e).into_response(),
    };
    let Some(slot) = QueueSlot::take(&engine) else {
        return ApiError::status(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "{} requests are already waiting; try again later",
                engine.max_queue
            ),
            Some("server_overloaded"),
        )
        .into_response();
    };
    let id = completion_id();
    let created = now();
    let cancel = Arc::new(AtomicBool::new(false));
    let guard = CancelOnDrop(cancel.clone());
    if !req.stream {
        // a client that leaves while queued drops this future, its slot with it
        let turn = engine.turn.clone().lock_owned().await;
        let e2 = engine.clone();
        let done = tokio::task::spawn_blocking(move || {
            // held until the generation has really ended, even when nobody waits for it
            let _held = (slot, turn);
            let r = e2.generate(&req, &cancel, |_| true);
            (req.model, r)
        })
        .await;
        drop(guard);
        return match done {
            Ok((model, Ok(f))) => Json(json!({
                "id": id, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": f.text},
                             "finish_reason": f.finish_reason, "logprobs": null}],
                "usage": usage(&f),
            }))
            .into_response(),
            Ok((_, Err(e))) => e.into_response(),
            Err(e) => {
                ApiError::internal(format!("internal error while answering: {e}")).into_response()
            }
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
        // a client that leaves while queued gives its place back at once
        let turn = tokio::select! {
            t = e2.turn.clone().lock_owned() => t,
            _ = tx.closed() => return,
        };
        let e3 = e2.clone();
        let tx2 = tx.clone();
        let include_usage = req.include_usage;
        let r = tokio::task::spawn_blocking(move || {
            let _held = (slot, turn);
            let first = chunk(json!({"role": "assistant", "content": ""}), None);
            let mut open = tx2.blocking_send(first).is_ok();
            let r = e3.generate(&req, &cancel, |piece| {
                open = open && tx2.blocking_send(chunk(json!({"content": piece}), None)).is_ok();
                open
            });
            match r {
                Ok(f) => {
                    let _ = tx2.blocking_send(chunk(json!({}), Some(f.finish_reason)));
                    if include_usage {
                        let _ = tx2.blocking_send(Event::default().data(
                            json!({"object": "chat.completion.chunk", "choices": [], "usage": usage(&f)})
                                .to_string(),
                        ));
                    }
                }
                Err(e) => {
                    let _ = tx2.blocking_send(Event::default().data(
                        json!({"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.code}})
                            .to_string(),
                    ));
                }
            }
        })
        .await;
        if r.is_err() {
            let msg = json!({"error": {"message": "internal error while answering", "type": "server_error", "param": null, "code": null}});
            let _ = tx.send(Event::default().data(msg.to_string())).await;
        }
        let _ = tx.send(Event::default().data("[DONE]")).await;
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

/// 200 while the server takes work; 503 when a new request would be refused (queue full).
async fn health(State(engine): State<Arc<Engine>>) -> Response {
    let waiting = engine.waiting.load(Ordering::SeqCst);
    let busy = engine.turn.try_lock().is_err();
    let body = |status: &str| json!({"status": status, "requests": waiting, "running": usize::from(busy), "max_queue": engine.max_queue});
    if waiting >= engine.max_queue {
        (StatusCode::SERVICE_UNAVAILABLE, Json(body("full"))).into_response()
    } else {
        Json(body("ok")).into_response()
    }
}

async fn not_found(req: Request) -> ApiError {
    ApiError::status(
        StatusCode::NOT_FOUND,
        format!(
            "no route {} {} (this server has POST /v1/chat/completions, GET /v1/models, GET /health)",
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
async fn authorize(State(engine): State<Arc<Engine>>, req: Request, next: Next) -> Response {
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
    let api_key = o.api_key.as_ref().map(|k| {
        use sha2::Digest;
        sha2::Sha256::digest(k.trim().as_bytes()).into()
    });
    let engine = Arc::new(Engine {
        template: session.template.clone(),
        tok: session.tok.clone(),
        session: std::sync::Mutex::new(session),
        adapters,
        base_name: o.base_name.clone(),
        gen_config,
        defaults: o.defaults.clone(),
        context,
        waiting: AtomicUsize::new(0),
        max_queue: o.max_queue,
        turn: Arc::new(tokio::sync::Mutex::new(())),
        api_key,
    });
    let api = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            engine.clone(),
            authorize,
        ));
    let app = Router::new()
        .route("/health", get(health))
        .method_not_allowed_fallback(method_not_allowed)
        .merge(api)
        .with_state(engine)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_back_stop_prefixes_end_on_character_boundaries() {
        let stops = vec!["。".to_string(), "END".to_string()];
        // '。' is 3 bytes: a text ending in the first byte of it cannot arise from &str, but
        // one ending in "EN" holds back 2 bytes, and "。" itself is matched whole, not held
        assert_eq!(stop_prefix_len("好的EN", &stops), 2);
        assert_eq!(stop_prefix_len("好的", &stops), 0);
        assert_eq!(stop_prefix_len("E", &stops), 1);
        let multi = vec!["。\n".to_string()];
        assert_eq!(stop_prefix_len("好的。", &multi), "。".len());
    }
}
