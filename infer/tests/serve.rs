//! `infer --serve` on 127.0.0.1 with the real SmolLM2 and two adapters: non-streaming and
//! streaming completions equal to `infer --prompt`, the adapters picked by name, every error in
//! OpenAI's shape, a client that goes away, and SIGTERM letting a running request finish.

use common::testing::real_model_dir;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// A random adapter on q/v with a visible effect, seeded.
fn adapter(dir: &Path, seed: u64) {
    common::testing::random_adapter(dir, seed).unwrap()
}

struct Server {
    child: Child,
    base: String,
    stderr: BufReader<std::process::ChildStderr>,
}

impl Server {
    fn start(model: &Path, adapters: &[(&str, &Path)]) -> Server {
        Self::start_with(model, adapters, &[], &[])
    }

    /// With extra flags and environment variables.
    fn start_with(
        model: &Path,
        adapters: &[(&str, &Path)],
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Server {
        let mut c = Command::new(env!("CARGO_BIN_EXE_infer"));
        c.args(["--model", model.to_str().unwrap(), "--serve", "127.0.0.1:0"]);
        c.args(["--served-model-name", "smol"]);
        for (n, d) in adapters {
            c.args(["--adapter", &format!("{n}={}", d.display())]);
        }
        c.args(extra).envs(env.iter().copied());
        let mut child = c
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let stderr = BufReader::new(child.stderr.take().unwrap());
        // Built before the first read, so a failed start still kills and reaps the child.
        let mut server = Server {
            child,
            base: String::new(),
            stderr,
        };
        let line = server.log_line("on http://");
        let rest = line.split("on http://").nth(1).unwrap();
        server.base = format!("http://{}", rest.split_whitespace().next().unwrap());
        server
    }

    fn post(&self, body: &Value) -> (u16, Value) {
        let r = ureq::post(&format!("{}/chat/completions", self.base))
            .config()
            .http_status_as_error(false)
            .build()
            .send_json(body)
            .unwrap();
        let status = r.status().as_u16();
        let v: Value = r.into_body().read_json().unwrap_or(Value::Null);
        (status, v)
    }

    /// The server's next stderr line that contains `needle` (blocks until it comes).
    fn log_line(&mut self, needle: &str) -> String {
        let mut line = String::new();
        loop {
            line.clear();
            assert!(
                self.stderr.read_line(&mut line).unwrap() > 0,
                "the server ended before logging '{needle}'"
            );
            if line.contains(needle) {
                return line;
            }
        }
    }

    /// `GET /health`: status and body.
    fn health(&self) -> (u16, Value) {
        let r = ureq::get(&format!("{}/health", self.base.trim_end_matches("/v1")))
            .config()
            .http_status_as_error(false)
            .build()
            .call()
            .unwrap();
        let status = r.status().as_u16();
        (status, r.into_body().read_json().unwrap_or(Value::Null))
    }

    /// Waits (at most 60 s) until no request holds or awaits the model.
    fn wait_idle(&self) {
        let t = std::time::Instant::now();
        while self.health().1["waiting"] != 0 || self.health().1["running"] != 0 {
            assert!(
                t.elapsed().as_secs() < 60,
                "a request kept its place: {:?}",
                self.health()
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// A POST whose client gives up after `secs` (it reads nothing back).
    fn post_and_leave(&self, body: &Value, secs: f64) {
        let r = ureq::post(&format!("{}/chat/completions", self.base))
            .config()
            .timeout_global(Some(std::time::Duration::from_secs_f64(secs)))
            .build()
            .send_json(body);
        assert!(r.is_err(), "the request was answered within {secs} s");
    }

    /// Any request: method, path under the base URL's host, headers, body.
    fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> (u16, Value) {
        let url = format!("{}{path}", self.base.trim_end_matches("/v1"));
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .allow_non_standard_methods(true)
            .build()
            .into();
        let mut b = ureq::http::Request::builder().method(method).uri(&url);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let r = agent
            .run(b.body(body.unwrap_or_default().to_vec()).unwrap())
            .unwrap();
        let status = r.status().as_u16();
        (status, r.into_body().read_json().unwrap_or(Value::Null))
    }

    fn post_raw(&self, body: &str) -> (u16, Value) {
        let r = ureq::post(&format!("{}/chat/completions", self.base))
            .config()
            .http_status_as_error(false)
            .build()
            .content_type("application/json")
            .send(body)
            .unwrap();
        let status = r.status().as_u16();
        (status, r.into_body().read_json().unwrap_or(Value::Null))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

/// `infer --prompt` on the command line: the reply text.
fn cli(model: &Path, adapter: Option<&Path>, prompt: &str, extra: &[&str]) -> String {
    let mut c = Command::new(env!("CARGO_BIN_EXE_infer"));
    c.args(["--model", model.to_str().unwrap(), "--prompt", prompt]);
    if let Some(a) = adapter {
        c.args(["--adapter", a.to_str().unwrap()]);
    }
    let o = c.args(extra).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout)
        .trim_end_matches('\n')
        .to_string()
}

fn ask(model: &str, prompt: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 24})
}

#[test]
fn the_api_answers_as_the_command_line_does() {
    let real = real_model_dir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (a1, a2) = (tmp.path().join("a1"), tmp.path().join("a2"));
    adapter(&a1, 1);
    adapter(&a2, 2);
    let srv = Server::start(&real, &[("calm", &a1), ("brisk", &a2)]);
    // models and health
    let models: Value = ureq::get(&format!("{}/models", srv.base))
        .call()
        .unwrap()
        .into_body()
        .read_json()
        .unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    // the base, then the adapters in the order given (as vLLM's --lora-modules)
    assert_eq!(ids, ["smol", "calm", "brisk"]);
    let health = ureq::get(&format!("{}/health", srv.base.trim_end_matches("/v1")))
        .call()
        .unwrap();
    assert_eq!(health.status().as_u16(), 200);

    let prompt = "Give me one tip for sleeping better.";
    let mut answers = Vec::new();
    for (name, dir) in [
        ("smol", None),
        ("calm", Some(a1.as_path())),
        ("brisk", Some(a2.as_path())),
    ] {
        let (status, v) = srv.post(&ask(name, prompt));
        assert_eq!(status, 200, "{v}");
        let text = v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(v["model"], name);
        // the API returns the text as generated; the command line prints it trimmed
        assert_eq!(
            text.trim(),
            cli(&real, dir, prompt, &["--max-new-tokens", "24"]),
            "{name}"
        );
        let u = &v["usage"];
        assert_eq!(
            u["total_tokens"].as_u64().unwrap(),
            u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap()
        );
        assert!(["stop", "length"].contains(&v["choices"][0]["finish_reason"].as_str().unwrap()));
        answers.push(text);
    }
    assert!(
        answers[0] != answers[1] && answers[1] != answers[2],
        "the adapters are in effect: {answers:?}"
    );
    // sampling with a seed: the same as the command line with that seed
    let mut body = ask("calm", prompt);
    body["temperature"] = json!(0.9);
    body["seed"] = json!(7);
    let (_, v) = srv.post(&body);
    let sampled = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(
        sampled.trim(),
        cli(
            &real,
            Some(&a1),
            prompt,
            &[
                "--max-new-tokens",
                "24",
                "--temperature",
                "0.9",
                "--seed",
                "7"
            ]
        )
    );

    // streaming: role first, then content deltas that add up to the same text, then [DONE]
    let mut body = ask("brisk", prompt);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let r = ureq::post(&format!("{}/chat/completions", srv.base))
        .send_json(&body)
        .unwrap();
    assert!(r
        .headers()
        .get("content-type")
        .unwrap()
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let mut raw = String::new();
    r.into_body()
        .into_reader()
        .read_to_string(&mut raw)
        .unwrap();
    let events: Vec<&str> = raw
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{raw}");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0)?["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, answers[2]);
    assert!(chunks.iter().any(|c| c["choices"]
        .get(0)
        .is_some_and(|x| !x["finish_reason"].is_null())));
    assert!(
        chunks.last().unwrap()["usage"]["completion_tokens"]
            .as_u64()
            .unwrap()
            > 0
    );

    // a stop string ends the reply before it
    let mut body = ask("smol", "Count from 1 to 10, separated by commas.");
    body["stop"] = json!([","]);
    let (_, v) = srv.post(&body);
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(!text.contains(','), "{text}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
}

#[test]
fn bad_requests_get_openai_errors_and_never_crash_the_server() {
    let real = real_model_dir().unwrap();
    let srv = Server::start(&real, &[]);
    let long = "word ".repeat(9000);
    let cases: Vec<(u16, Option<Value>, Option<&str>, &str)> = vec![
        (400, None, Some("{not json"), "invalid JSON"),
        (400, None, Some("[1, 2]"), "JSON object"),
        (404, Some(ask("gpt-5", "hi")), None, "does not exist"),
        (
            400,
            Some(json!({"model": "smol", "messages": []})),
            None,
            "must not be empty",
        ),
        (
            400,
            Some(json!({"model": "smol", "messages": [{"role": "robot", "content": "x"}]})),
            None,
            "unknown role",
        ),
        (
            400,
            Some(ask("smol", &long)),
            None,
            "maximum context length",
        ),
        (
            400,
            Some(json!({"messages": [{"role": "user", "content": "hi"}], "temperature": 5})),
            None,
            "temperature",
        ),
        (
            400,
            Some(json!({"messages": [{"role": "user", "content": "hi"}], "top_p": 0})),
            None,
            "top_p",
        ),
        (
            400,
            Some(json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0})),
            None,
            "max_tokens",
        ),
        (
            400,
            Some(json!({"messages": [{"role": "user", "content": "hi"}], "stop": 3})),
            None,
            "stop",
        ),
        // what the server does not do, or values of the wrong type, are refused, not ignored
        (
            400,
            Some(json!({"messages": [{"role": "user", "content": "hi"}], "n": 5})),
            None,
            "'n' must be 1",
        ),
        (
            400,
            Some(json!({"messages": [{"role": "user", "content": "hi"}], "n": "five"})),
            None,
            "'n' must be",
        ),
        (
            400,
            Some(json!({"messages": [{"role": "user", "content": "hi"}], "stream": "yes"})),
            None,
            "'stream' must be true or false",
        ),
        (
            400,
            Some(
                json!({"messages": [{"role": "user", "content": "hi"}], "stream": true, "stream_options": {"include_usage": "yes"}}),
            ),
            None,
            "'include_usage' must be",
        ),
        (
            400,
            Some(
                json!({"messages": [{"role": "user", "content": "hi"}], "logprobs": true, "top_logprobs": 21}),
            ),
            None,
            "'top_logprobs' must be between 0 and 20",
        ),
        (
            400,
            Some(json!({"messages": [{"role": "user", "content": "hi"}], "ignore_eos": "yes"})),
            None,
            "'ignore_eos' must be true or false",
        ),
        (
            400,
            Some(json!({"messages": [{"role": "user", "content": "hi"}], "presence_penalty": 2.5})),
            None,
            "'presence_penalty' must be between -2 and 2",
        ),
        // 1e-46 is 0 as the sampler's f32: refused, not top-p silently off
        (
            400,
            Some(json!({"messages": [{"role": "user", "content": "hi"}], "top_p": 1e-46})),
            None,
            "32-bit float",
        ),
        (
            400,
            Some(json!({"messages": ["hi"]})),
            None,
            "messages[0] must be an object",
        ),
        (
            400,
            Some(json!({"messages": [{"role": 1, "content": "x"}]})),
            None,
            "messages[0].role must be a string",
        ),
        (
            400,
            Some(json!({"messages": [{"role": "user"}]})),
            None,
            "messages[0].content is missing",
        ),
    ];
    for (want, body, raw, msg) in cases {
        let (status, v) = match (body, raw) {
            (Some(b), _) => srv.post(&b),
            (_, Some(r)) => srv.post_raw(r),
            _ => unreachable!(),
        };
        assert_eq!(status, want, "{msg}: {v}");
        let e = &v["error"];
        assert!(e["message"].as_str().unwrap().contains(msg), "{msg}: {v}");
        assert!(e["type"].is_string(), "{v}");
    }
    // transport-level errors in OpenAI's shape with their own statuses
    let json_ct = [("content-type", "application/json")];
    // a 5 MB body: 413 (read while the body is still being sent, as curl does)
    let addr = srv
        .base
        .trim_start_matches("http://")
        .trim_end_matches("/v1");
    let s = std::net::TcpStream::connect(addr).unwrap();
    let mut w = s.try_clone().unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        5 << 20
    );
    let sender = std::thread::spawn(move || {
        let _ = w.write_all(head.as_bytes());
        let _ = w.write_all(&vec![b' '; 5 << 20]); // the server may stop reading: ignored
    });
    let mut response = String::new();
    BufReader::new(s).read_line(&mut response).unwrap();
    assert!(response.contains(" 413 "), "{response}");
    sender.join().unwrap();
    let hi = serde_json::to_vec(&ask("smol", "hi")).unwrap();
    type Case<'a> = (
        u16,
        &'a str,
        &'a str,
        &'a [(&'a str, &'a str)],
        Option<&'a [u8]>,
        &'a str,
    );
    let transport: Vec<Case> = vec![
        (
            415,
            "POST",
            "/v1/chat/completions",
            &[("content-type", "text/plain")],
            Some(&hi),
            "content type",
        ),
        (404, "GET", "/v1/nothing", &[], None, "no route"),
        (
            404,
            "POST",
            "/v1/completions",
            &json_ct,
            Some(&hi),
            "no route",
        ),
        (405, "DELETE", "/v1/models", &[], None, "not allowed"),
        (405, "GET", "/v1/chat/completions", &[], None, "not allowed"),
        (405, "POST", "/health", &[], None, "not allowed"),
    ];
    for (want, method, path, headers, body, msg) in transport {
        let (status, v) = srv.request(method, path, headers, body);
        assert_eq!(status, want, "{method} {path}: {v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(msg),
            "{method} {path}: {v}"
        );
        assert!(v["error"]["type"].is_string(), "{v}");
    }
    // a JSON body without a content type is read as JSON (curl -d with -H omitted is not)
    assert_eq!(
        srv.request("POST", "/v1/chat/completions", &[], Some(&hi))
            .0,
        200
    );
    // text parts are content too
    let parts = json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "max_tokens": 24});
    let (status, v) = srv.post(&parts);
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        v["choices"][0]["message"]["content"],
        srv.post(&ask("smol", "hi")).1["choices"][0]["message"]["content"]
    );
    // still serving
    let (status, _) = srv.post(&ask("smol", "hi"));
    assert_eq!(status, 200);
}

/// Clients that give up while decoding, while their prompt is prefilled and while queued:
/// each gives its place back (a batch of 1 and a queue of 1 here: before the fix of issue 23
/// every one kept it and the server answered 429 forever), a long abandoned prompt is not
/// prefilled to its end, and `/health` says 503 while no new request would be taken.
#[test]
fn clients_that_give_up_free_their_place_and_health_reports_a_full_queue() {
    let real = real_model_dir().unwrap();
    let mut srv = Server::start_with(&real, &[], &["--max-queue", "1", "--max-batch", "1"], &[]);
    let long_story = json!({"messages": [{"role": "user", "content": "Tell me a long story"}], "max_tokens": 400});
    // leaves while decoding
    srv.post_and_leave(&long_story, 1.5);
    srv.log_line("stopped after");
    srv.wait_idle();
    // leaves while its ~3,000-token prompt is prefilled: stopped between chunks
    let words = "story ".repeat(3000);
    srv.post_and_leave(&ask("smol", &words), 1.5);
    let line = srv.log_line("its prompt was stopped after");
    let nums: Vec<usize> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    assert!(nums.len() == 2 && nums[0] < nums[1], "{line}");
    srv.wait_idle();
    // leaves while queued behind a running stream; the queue is full meanwhile
    let body = json!({"messages": [{"role": "user", "content": "Write a long story about a lighthouse."}],
                      "max_tokens": 2000, "stream": true});
    let stream = ureq::post(&format!("{}/chat/completions", srv.base))
        .send_json(&body)
        .unwrap();
    let mut reader = BufReader::new(stream.into_body().into_reader());
    let mut first = String::new();
    reader.read_line(&mut first).unwrap();
    assert!(first.starts_with("data: "), "{first}");
    let base = srv.base.clone();
    let queued = std::thread::spawn(move || {
        ureq::post(&format!("{base}/chat/completions"))
            .config()
            .timeout_global(Some(std::time::Duration::from_secs(3)))
            .build()
            .send_json(ask("smol", "hi"))
            .is_err()
    });
    std::thread::sleep(std::time::Duration::from_millis(1000));
    let (status, h) = srv.health();
    assert_eq!((status, &h["status"]), (503, &json!("full")), "{h}");
    assert_eq!(srv.post(&ask("smol", "hi")).0, 429);
    assert!(queued.join().unwrap(), "the queued request was answered");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let h = srv.health().1;
    assert_eq!(
        (&h["waiting"], &h["running"]),
        (&json!(0), &json!(1)),
        "only the stream holds a place: {h}"
    );
    drop(reader);
    srv.wait_idle();
    assert_eq!(srv.health().0, 200);
    let (status, v) = srv.post(&ask("smol", "hi"));
    assert_eq!(status, 200, "{v}");
}

/// A request that fails or panics with an adapter leaves nothing behind: the base answers as
/// before. Before the fix a multibyte stop string panicked the request (bytes sliced inside
/// '。') and every later base request was answered with the adapter's weights. The chat
/// template's own errors (raise_exception) are the client's: 400 naming the problem.
#[test]
fn no_request_leaves_an_adapter_behind_and_template_errors_are_the_clients() {
    let real = real_model_dir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let a1 = tmp.path().join("a1");
    adapter(&a1, 1);
    // SmolLM2's template, with the alternation check many chat templates have
    let template = tmp.path().join("strict.jinja");
    std::fs::write(
        &template,
        "{%- for m in messages %}{%- if loop.index0 > 0 and m.role == messages[loop.index0 - 1].role %}\
         {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif %}\
         {{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>' + '\n' }}{%- endfor %}\
         {%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{%- endif %}",
    )
    .unwrap();
    let srv = Server::start_with(
        &real,
        &[("calm", &a1)],
        &["--template", template.to_str().unwrap()],
        &[],
    );
    let prompt = "I cannot sleep before exams.";
    let base_answer = |srv: &Server| {
        let (status, v) = srv.post(&ask("smol", prompt));
        assert_eq!(status, 200, "{v}");
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let before = base_answer(&srv);
    let mut body = ask("calm", prompt);
    body["stop"] = json!(["。", "zz。"]);
    let (status, v) = srv.post(&body);
    assert_eq!(status, 200, "{v}");
    let tuned = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert_ne!(tuned, before, "the adapter is in effect");
    assert_eq!(base_answer(&srv), before, "the base answers as the base");
    // the template refuses two user turns in a row: the client's mistake, said as such
    let two = json!({"model": "calm", "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]});
    let (status, v) = srv.post(&two);
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("must alternate"),
        "{v}"
    );
    assert_eq!(base_answer(&srv), before);
}

/// `--api-key` (here from DIALORA_API_KEY, and from a file): every route but /health asks for
/// it, and a wrong or missing key gets OpenAI's 401.
#[test]
fn an_api_key_is_required_when_set() {
    let real = real_model_dir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let key_file = tmp.path().join("key");
    std::fs::write(&key_file, "sk-from-file\n").unwrap();
    for (extra, env, key) in [
        (
            vec![],
            vec![("DIALORA_API_KEY", "sk-test-123")],
            "sk-test-123",
        ),
        (
            vec!["--api-key-file", key_file.to_str().unwrap()],
            vec![],
            "sk-from-file",
        ),
    ] {
        let srv = Server::start_with(&real, &[], &extra, &env);
        let hi = serde_json::to_vec(&ask("smol", "hi")).unwrap();
        let ct = ("content-type", "application/json");
        let bearer = format!("Bearer {key}");
        let wrong = format!("Bearer {key}x");
        for auth in [None, Some(wrong.as_str()), Some("sk-test-123")] {
            let mut h = vec![ct];
            h.extend(auth.map(|a| ("authorization", a)));
            let (status, v) = srv.request("POST", "/v1/chat/completions", &h, Some(&hi));
            assert_eq!(status, 401, "{auth:?}: {v}");
            assert_eq!(v["error"]["code"], "invalid_api_key", "{v}");
            assert_eq!(srv.request("GET", "/v1/models", &h, None).0, 401);
        }
        let h = [ct, ("authorization", bearer.as_str())];
        assert_eq!(
            srv.request("POST", "/v1/chat/completions", &h, Some(&hi)).0,
            200
        );
        assert_eq!(srv.request("GET", "/v1/models", &h, None).0, 200);
        assert_eq!(srv.health().0, 200, "/health stays open");
    }
}

#[test]
fn a_client_that_goes_away_stops_and_sigterm_lets_requests_finish() {
    let real = real_model_dir().unwrap();
    let mut srv = Server::start(&real, &[]);
    let addr = srv
        .base
        .trim_start_matches("http://")
        .trim_end_matches("/v1")
        .to_string();
    let body =
        json!({"messages": [{"role": "user", "content": "Write a long story about a lighthouse."}],
                      "max_tokens": 2000, "stream": true})
        .to_string();
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    // a streaming client that reads a little and hangs up
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).contains("200 OK"));
    drop(s);
    // the model is free again long before 2000 tokens: the next request is answered quickly
    let t = std::time::Instant::now();
    let (status, _) = srv.post(&ask("smol", "hi"));
    assert_eq!(status, 200);
    assert!(
        t.elapsed().as_secs() < 30,
        "the abandoned generation kept the model busy"
    );
    // SIGTERM while a request runs: it finishes, then the server exits 0
    let base = srv.base.clone();
    let running = std::thread::spawn(move || {
        let r = ureq::post(&format!("{base}/chat/completions"))
            .send_json(json!({"messages": [{"role": "user", "content": "Tell me about the sea."}], "max_tokens": 60}))
            .unwrap();
        r.into_body().read_json::<Value>().unwrap()
    });
    std::thread::sleep(std::time::Duration::from_millis(800));
    Command::new("kill")
        .args(["-TERM", &srv.child.id().to_string()])
        .status()
        .unwrap();
    let v = running.join().unwrap();
    assert!(
        !v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .is_empty(),
        "{v}"
    );
    let status = srv.child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    let mut rest = String::new();
    srv.stderr.read_to_string(&mut rest).unwrap();
    assert!(rest.contains("finishing running requests"), "{rest}");
}

/// Requests for the base and two adapters sent at once share the batch and get the answers
/// each gets alone; `logprobs`/`top_logprobs`, a frequency penalty, `ignore_eos` and
/// `GET /metrics` work as an OpenAI (or vLLM) client expects.
#[test]
fn concurrent_requests_for_different_adapters_get_their_lone_answers() {
    let real = real_model_dir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (a1, a2) = (tmp.path().join("a1"), tmp.path().join("a2"));
    adapter(&a1, 1);
    adapter(&a2, 2);
    let srv = Server::start_with(
        &real,
        &[("a1", &a1), ("a2", &a2)],
        &["--max-batch", "8"],
        &[],
    );
    let prompts = [
        "I feel anxious about my exams.",
        "My friend stopped talking to me and I do not know why.",
    ];
    let mut bodies = Vec::new();
    for p in prompts {
        for m in ["smol", "a1", "a2"] {
            bodies.push(ask(m, p));
        }
    }
    let text = |v: &Value| {
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let alone: Vec<String> = bodies
        .iter()
        .map(|b| {
            let (status, v) = srv.post(b);
            assert_eq!(status, 200, "{v}");
            text(&v)
        })
        .collect();
    assert_ne!(alone[0], alone[1], "the adapter is in effect");
    let base = srv.base.clone();
    let together: Vec<String> = std::thread::scope(|s| {
        let hs: Vec<_> = bodies
            .iter()
            .map(|b| {
                let base = base.clone();
                s.spawn(move || {
                    let v: Value = ureq::post(&format!("{base}/chat/completions"))
                        .send_json(b)
                        .unwrap()
                        .into_body()
                        .read_json()
                        .unwrap();
                    text(&v)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(together, alone);
    // log-probabilities: one entry per token, the alternatives sorted, at most 0
    let mut b = ask("a1", prompts[0]);
    b["logprobs"] = json!(true);
    b["top_logprobs"] = json!(3);
    let (status, v) = srv.post(&b);
    assert_eq!(status, 200, "{v}");
    assert_eq!(text(&v), alone[1], "logprobs change nothing");
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(
        content.len() as u64,
        v["usage"]["completion_tokens"].as_u64().unwrap(),
        "{v}"
    );
    for t in content {
        let lp = t["logprob"].as_f64().unwrap();
        let top: Vec<f64> = t["top_logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["logprob"].as_f64().unwrap())
            .collect();
        assert!(
            lp <= 0.0 && top.len() == 3 && top.windows(2).all(|w| w[0] >= w[1]),
            "{t}"
        );
        assert!(top[0] >= lp - 1e-6, "greedy picks the most likely: {t}");
    }
    // a frequency penalty changes a greedy answer that repeats itself
    let mut long = ask(
        "smol",
        "List the days of the week, one per line, three times.",
    );
    long["max_tokens"] = json!(60);
    let plain = text(&srv.post(&long).1);
    long["frequency_penalty"] = json!(2.0);
    let penalised = text(&srv.post(&long).1);
    assert_ne!(plain, penalised);
    // vLLM's ignore_eos: a short answer goes on past its end-of-turn to max_tokens
    let mut short = ask("smol", "Say hello.");
    short["max_tokens"] = json!(40);
    let (_, ended) = srv.post(&short);
    assert_eq!(ended["choices"][0]["finish_reason"], "stop", "{ended}");
    let n = ended["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(n < 40, "{ended}");
    short["ignore_eos"] = json!(true);
    let (status, full) = srv.post(&short);
    assert_eq!(status, 200, "{full}");
    assert_eq!(full["choices"][0]["finish_reason"], "length", "{full}");
    assert_eq!(full["usage"]["completion_tokens"], 40, "{full}");
    assert!(
        text(&full).starts_with(&text(&ended)),
        "{full} after {ended}"
    );
    // metrics in Prometheus' text format
    let m = ureq::get(&format!("{}/metrics", base.trim_end_matches("/v1")))
        .call()
        .unwrap()
        .into_body()
        .read_to_string()
        .unwrap();
    let value = |name: &str| -> f64 {
        m.lines()
            .find(|l| l.starts_with(name) && !l.starts_with('#'))
            .and_then(|l| l.split_whitespace().last()?.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing in:\n{m}"))
    };
    assert!(
        value("dialora_generation_tokens_total") >= 12.0 * 2.0,
        "{m}"
    );
    assert_eq!(value("dialora_num_requests_running"), 0.0);
    assert!(
        value("dialora_time_per_output_token_seconds_count") >= 12.0,
        "{m}"
    );
    assert!(
        m.contains("dialora_request_success_total{finished_reason=\"stop\"}")
            || m.contains("finished_reason=\"length\""),
        "{m}"
    );
}
