//! Load generator for the orders benchmark (`bench/orders/run.sh`), in Rust: POST N orders,
//! then wait for every store's ack. The Rust twin of `bench/orders/load.py`: same options,
//! same POST body, same ack check, same JSON line on stdout and `--dump` file, so
//! `table.py` and `stages.py` read either. It exists because the Python generator cost
//! about 0.26 ms of CPU per order on the benchmark's 2 cores, as much as half of `qosmos
//! serve`; this one costs a small fraction of that and so takes less CPU from the stack
//! being measured (it reports its own CPU as `gen_cpu_s`).
//!
//! ```sh
//! cargo build --release -p qosmos-orders --example orders_load
//! target/release/examples/orders_load --url http://127.0.0.1:8080 --orders 8000 --rate 1000
//! ```
//!
//! How it runs: `--procs` threads (each a single-threaded tokio runtime) with `--conns`
//! keep-alive HTTP/1.1 connections each (a minimal client over `TcpStream`, `TCP_NODELAY`:
//! one `write` per request, responses read by `Content-Length`; both services answer with
//! it). Order *i* belongs to thread `i % procs`, goes to store `{prefix}{i % stores}` and,
//! with `--rate R`, is sent no earlier than its slot `t0 + i/R` (open loop: if every
//! connection is busy the send is late, and `late`/`sched` show it); `--rate 0` is a
//! closed loop (each connection sends its next POST when the previous answer arrived).
//! After its POSTs each thread reads its orders back (`GET /api/orders/{id}`, oldest
//! first, 200 ms between tries of an order not yet `accepted`/`rejected`) until the
//! deadline. The measures are defined in `load.py`'s docstring; in short: send = wall
//! clock just before the request is written, acked = the `at` of the history entry of
//! the order's final status (server clock, same machine), latency = acked − send,
//! sched = acked − slot, orders/s = acked / (last acked − first send).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use qosmos_orders::time::Timestamp;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Debug, Clone)]
struct Args {
    url: String,
    orders: usize,
    stores: usize,
    store_prefix: String,
    rate: f64,
    conns: usize,
    procs: usize,
    timeout: f64,
    store_out: String,
    label: String,
    dump: String,
}

const USAGE: &str = "usage: orders_load --url URL [--orders N] [--stores N] [--store-prefix P] \
[--rate R] [--conns N] [--procs N] [--timeout S] [--store-out GLOB] [--label L] [--dump FILE]";

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        url: String::new(),
        orders: 2000,
        stores: 4,
        store_prefix: "store-".into(),
        rate: 0.0,
        conns: 8,
        procs: 2,
        timeout: 120.0,
        store_out: String::new(),
        label: String::new(),
        dump: String::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        if k == "-h" || k == "--help" {
            return Err(USAGE.into());
        }
        let v = it
            .next()
            .ok_or_else(|| format!("{k} needs a value\n{USAGE}"))?;
        let num = |v: &str| v.parse::<f64>().map_err(|e| format!("{k} {v}: {e}"));
        let int = |v: &str| v.parse::<usize>().map_err(|e| format!("{k} {v}: {e}"));
        match k.as_str() {
            "--url" => a.url = v,
            "--orders" => a.orders = int(&v)?,
            "--stores" => a.stores = int(&v)?.max(1),
            "--store-prefix" => a.store_prefix = v,
            "--rate" => a.rate = num(&v)?,
            "--conns" => a.conns = int(&v)?.max(1),
            "--procs" => a.procs = int(&v)?.max(1),
            "--timeout" => a.timeout = num(&v)?,
            "--store-out" => a.store_out = v,
            "--label" => a.label = v,
            "--dump" => a.dump = v,
            _ => return Err(format!("unknown option {k}\n{USAGE}")),
        }
    }
    if a.url.is_empty() {
        return Err(USAGE.into());
    }
    Ok(a)
}

/// `http://host:port` → `host:port`.
fn host_port(url: &str) -> Result<String, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("--url {url}: only http:// URLs"))?;
    let hp = rest.split('/').next().unwrap_or(rest);
    Ok(if hp.contains(':') {
        hp.to_string()
    } else {
        format!("{hp}:80")
    })
}

fn wall() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// CPU seconds (user + system) of this process so far, from `/proc/self/stat`
/// (clock ticks of 1/100 s, Linux's `USER_HZ`).
fn cpu_seconds() -> f64 {
    let Ok(s) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the command name (which is in parentheses and may hold spaces).
    let Some(after) = s.rfind(')').map(|i| &s[i + 1..]) else {
        return 0.0;
    };
    let f: Vec<&str> = after.split_whitespace().collect();
    // after ')' : state(3) ... utime is field 14, stime 15 (1-based over the whole line).
    let get = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    (get(11) + get(12)) / 100.0
}

/// One keep-alive HTTP/1.1 connection.
struct Conn {
    addr: String,
    host: String,
    stream: Option<TcpStream>,
    buf: Vec<u8>,
    out: Vec<u8>,
}

impl Conn {
    fn new(addr: &str) -> Self {
        let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h).to_string();
        Conn {
            addr: addr.to_string(),
            host,
            stream: None,
            buf: Vec::with_capacity(4096),
            out: Vec::with_capacity(512),
        }
    }

    async fn open(&mut self) -> io::Result<()> {
        let s = TcpStream::connect(&self.addr).await?;
        s.set_nodelay(true)?;
        self.stream = Some(s);
        self.buf.clear();
        Ok(())
    }

    /// Sends one request and reads its response: (status, body). Reconnects and retries
    /// when the server closed an idle connection before any byte of the answer (a POST
    /// only once, as load.py does).
    async fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> io::Result<(u16, Vec<u8>)> {
        self.out.clear();
        self.out.extend_from_slice(method.as_bytes());
        self.out.push(b' ');
        self.out.extend_from_slice(path.as_bytes());
        self.out.extend_from_slice(b" HTTP/1.1\r\nHost: ");
        self.out.extend_from_slice(self.host.as_bytes());
        self.out.extend_from_slice(b"\r\n");
        if let Some(b) = body {
            self.out
                .extend_from_slice(b"Content-Type: application/json\r\nContent-Length: ");
            self.out.extend_from_slice(b.len().to_string().as_bytes());
            self.out.extend_from_slice(b"\r\n");
        }
        self.out.extend_from_slice(b"\r\n");
        if let Some(b) = body {
            self.out.extend_from_slice(b);
        }
        let mut last = io::Error::other("no attempt");
        for attempt in 0..3 {
            if self.stream.is_none() {
                self.open().await?;
            }
            match self.exchange().await {
                Ok(Some(r)) => return Ok(r),
                Ok(None) => last = io::Error::other("connection closed before the response"),
                Err(e) => last = e,
            }
            self.stream = None;
            if method == "POST" && attempt > 0 {
                break;
            }
        }
        Err(last)
    }

    /// Ok(None): the connection closed before any response byte (safe to retry).
    async fn exchange(&mut self) -> io::Result<Option<(u16, Vec<u8>)>> {
        let Some(s) = self.stream.as_mut() else {
            return Ok(None);
        };
        s.write_all(&self.out).await?;
        self.buf.clear();
        let head_end = loop {
            if let Some(p) = find(&self.buf, b"\r\n\r\n") {
                break p + 4;
            }
            let n = read_more(s, &mut self.buf).await?;
            if n == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                return Err(io::Error::other("connection closed in a response header"));
            }
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let status = lines.next().unwrap_or("");
        let code = status
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse::<u16>().ok())
            .ok_or_else(|| io::Error::other(format!("bad status line {status:?}")))?;
        let (mut clen, mut close) = (0usize, status.starts_with("HTTP/1.0"));
        for ln in lines {
            let (k, v) = ln.split_once(':').unwrap_or((ln, ""));
            let k = k.trim();
            if k.eq_ignore_ascii_case("content-length") {
                clen = v
                    .trim()
                    .parse()
                    .map_err(|_| io::Error::other(format!("bad content-length {v:?}")))?;
            } else if k.eq_ignore_ascii_case("connection") && v.trim().eq_ignore_ascii_case("close")
            {
                close = true;
            }
        }
        while self.buf.len() < head_end + clen {
            if read_more(s, &mut self.buf).await? == 0 {
                return Err(io::Error::other("connection closed in a response body"));
            }
        }
        let body = self.buf[head_end..head_end + clen].to_vec();
        if close {
            self.stream = None;
        }
        Ok(Some((code, body)))
    }
}

async fn read_more(s: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<usize> {
    let len = buf.len();
    buf.resize(len + 4096, 0);
    let r = s.read(&mut buf[len..]).await;
    let n = *r.as_ref().unwrap_or(&0);
    buf.truncate(len + n);
    r
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

/// What happened to one order.
#[derive(Debug, Clone, Default)]
struct Rec {
    i: usize,
    send: f64,
    rtt_end: f64,
    code: i32,
    id: Option<String>,
    status: Option<String>,
    received: Option<f64>,
    dispatched: Option<f64>,
    acked: Option<f64>,
    acks: Option<i64>,
    slot: f64,
}

fn body_for(a: &Args, i: usize) -> Vec<u8> {
    // The same bytes as load.py's json.dumps(..., separators=(",", ":")).
    format!(
        "{{\"store_id\":\"{}{}\",\"items\":[{{\"sku\":\"sku-{}\",\"qty\":{}}}],\"note\":\"bench {}\"}}",
        a.store_prefix,
        i % a.stores,
        i % 97,
        1 + i % 3,
        i
    )
    .into_bytes()
}

fn parse_ts(s: &str) -> Option<f64> {
    Timestamp::parse_rfc3339(s).map(|t| t.as_micros() as f64 / 1e6)
}

/// Fills in the order's final status and history times from a `GET` answer; false when
/// it is not final yet.
fn read_final(r: &mut Rec, data: &[u8]) -> bool {
    let Ok(o) = serde_json::from_slice::<serde_json::Value>(data) else {
        return false;
    };
    let Some(status) = o.get("status").and_then(|s| s.as_str()) else {
        return false;
    };
    if status != "accepted" && status != "rejected" {
        return false;
    }
    for h in o
        .get("history")
        .and_then(|h| h.as_array())
        .map(Vec::as_slice)
        .unwrap_or(&[])
    {
        let (Some(st), Some(at)) = (
            h.get("status").and_then(|v| v.as_str()),
            h.get("at").and_then(|v| v.as_str()),
        ) else {
            continue;
        };
        let at = parse_ts(at);
        if st == "received" && r.received.is_none() {
            r.received = at;
        }
        if st == "dispatched" && r.dispatched.is_none() {
            r.dispatched = at;
        }
        if st == status {
            r.acked = at;
        }
    }
    r.acks = o.get("acks").and_then(|v| v.as_i64());
    r.status = Some(status.to_string());
    true
}

/// One thread's share: orders `wid, wid + procs, ...`.
async fn worker(
    a: Rc<Args>,
    addr: String,
    wid: usize,
    t0: f64,
    base: (Instant, f64),
) -> io::Result<(Vec<Rec>, f64)> {
    let mine: Vec<usize> = (wid..a.orders).step_by(a.procs).collect();
    let mut conns = Vec::with_capacity(a.conns);
    for _ in 0..a.conns {
        let mut c = Conn::new(&addr);
        c.open().await?;
        conns.push(c);
    }
    let at = |wall_t: f64| base.0 + Duration::from_secs_f64((wall_t - base.1).max(0.0));
    let recs: Rc<RefCell<HashMap<usize, Rec>>> = Rc::new(RefCell::new(HashMap::new()));
    let next = Rc::new(Cell::new(0usize));
    let mine = Rc::new(mine);
    tokio::time::sleep_until(at(t0).into()).await;

    let posters = conns.iter_mut().map(|c| {
        let (a, recs, next, mine) = (a.clone(), recs.clone(), next.clone(), mine.clone());
        async move {
            loop {
                let k = next.get();
                let Some(&i) = mine.get(k) else { break };
                next.set(k + 1);
                let slot = if a.rate > 0.0 {
                    let slot = t0 + i as f64 / a.rate;
                    if slot > wall() {
                        tokio::time::sleep_until(at(slot).into()).await;
                    }
                    Some(slot)
                } else {
                    None
                };
                let body = body_for(&a, i);
                let send = wall();
                let mut r = Rec {
                    i,
                    send,
                    slot: slot.unwrap_or(send),
                    code: -1,
                    ..Rec::default()
                };
                match c.request("POST", "/api/orders", Some(&body)).await {
                    Ok((code, data)) => {
                        r.rtt_end = wall();
                        r.code = i32::from(code);
                        if code == 200 || code == 201 {
                            r.id = serde_json::from_slice::<serde_json::Value>(&data)
                                .ok()
                                .and_then(|v| {
                                    v.get("id").and_then(|x| x.as_str()).map(String::from)
                                });
                        }
                    }
                    Err(e) => {
                        r.rtt_end = wall();
                        eprintln!("POST failed: {e}");
                    }
                }
                recs.borrow_mut().insert(i, r);
            }
        }
    });
    futures_util::future::join_all(posters).await;
    let deadline = t0 + a.timeout;

    // Read back, oldest first.
    let todo: Rc<Vec<usize>> = Rc::new(
        mine.iter()
            .copied()
            .filter(|i| recs.borrow().get(i).is_some_and(|r| r.id.is_some()))
            .collect(),
    );
    let next = Rc::new(Cell::new(0usize));
    let pollers = conns.iter_mut().map(|c| {
        let (recs, next, todo) = (recs.clone(), next.clone(), todo.clone());
        async move {
            loop {
                let k = next.get();
                let Some(&i) = todo.get(k) else { break };
                next.set(k + 1);
                let path = match recs.borrow().get(&i).and_then(|r| r.id.clone()) {
                    Some(id) => format!("/api/orders/{id}"),
                    None => continue,
                };
                loop {
                    if let Ok((200, data)) = c.request("GET", &path, None).await {
                        let mut m = recs.borrow_mut();
                        if let Some(r) = m.get_mut(&i)
                            && read_final(r, &data)
                        {
                            break;
                        }
                    }
                    if wall() > deadline {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    });
    futures_util::future::join_all(pollers).await;
    let mut out: Vec<Rec> = recs.borrow_mut().drain().map(|(_, r)| r).collect();
    out.sort_by_key(|r| r.i);
    Ok((out, wall()))
}

/// load.py's percentile (nearest rank, Python's round half to even).
fn pct(xs: &mut [f64], p: f64) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    let k = ((p / 100.0 * n as f64 + 0.5).round_ties_even() as i64 - 1).clamp(0, n as i64 - 1);
    Some(xs[k as usize])
}

fn r2(x: Option<f64>) -> serde_json::Value {
    match x {
        Some(v) if v.is_finite() => serde_json::json!((v * 100.0).round() / 100.0),
        _ => serde_json::Value::Null,
    }
}

fn r1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// Files matching a glob with `*` in the file name only (what run.sh passes).
fn glob_files(pat: &str) -> Vec<String> {
    let (dir, name) = pat.rsplit_once('/').unwrap_or((".", pat));
    let parts: Vec<&str> = name.split('*').collect();
    let matches = |f: &str| {
        let mut rest = f;
        for (k, p) in parts.iter().enumerate() {
            if k == 0 {
                let Some(r) = rest.strip_prefix(p) else {
                    return false;
                };
                rest = r;
            } else if k == parts.len() - 1 {
                return rest.ends_with(p);
            } else {
                let Some(at) = rest.find(p) else { return false };
                rest = &rest[at + p.len()..];
            }
        }
        rest.is_empty()
    };
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let f = e.file_name().to_string_lossy().into_owned();
            if matches(&f) {
                out.push(format!("{dir}/{f}"));
            }
        }
    }
    out.sort();
    out
}

fn main() {
    let a = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(a) {
        eprintln!("orders_load: {e}");
        std::process::exit(1);
    }
}

fn run(a: Args) -> Result<(), String> {
    let addr = host_port(&a.url)?;
    let base = (Instant::now(), wall());
    let t0 = base.1 + 0.5;
    let cpu0 = cpu_seconds();
    let a = std::sync::Arc::new(a);
    let threads: Vec<_> = (0..a.procs)
        .map(|wid| {
            let (a, addr) = ((*a).clone(), addr.clone());
            std::thread::spawn(move || -> Result<(Vec<Rec>, f64), String> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())?;
                rt.block_on(worker(Rc::new(a), addr, wid, t0, base))
                    .map_err(|e| format!("worker {wid} failed: {e}"))
            })
        })
        .collect();
    let mut rows = Vec::with_capacity(a.orders);
    for t in threads {
        let (r, _) = t
            .join()
            .map_err(|_| "a worker thread panicked".to_string())??;
        rows.extend(r);
    }
    let gen_cpu = cpu_seconds() - cpu0;
    rows.sort_by_key(|r| r.i);
    report(&a, &rows, gen_cpu)
}

fn report(a: &Args, rows: &[Rec], gen_cpu: f64) -> Result<(), String> {
    let created: Vec<&Rec> = rows
        .iter()
        .filter(|r| r.code == 200 || r.code == 201)
        .collect();
    let failed = rows.len() - created.len();
    let acked: Vec<&Rec> = created
        .iter()
        .copied()
        .filter(|r| r.acked.is_some())
        .collect();
    let first_send = rows.iter().map(|r| r.send).fold(f64::INFINITY, f64::min);
    let last_ack = acked
        .iter()
        .filter_map(|r| r.acked)
        .fold(first_send, f64::max);
    let ms = |x: f64| x * 1000.0;
    let mut lat: Vec<f64> = acked
        .iter()
        .filter_map(|r| r.acked.map(|t| ms(t - r.send)))
        .collect();
    let mut rtt: Vec<f64> = created.iter().map(|r| ms(r.rtt_end - r.send)).collect();
    let mut srv: Vec<f64> = acked
        .iter()
        .filter_map(|r| Some(ms(r.acked? - r.received?)))
        .collect();
    let mut late: Vec<f64> = rows.iter().map(|r| ms(r.send - r.slot)).collect();
    let mut sched: Vec<f64> = acked
        .iter()
        .filter_map(|r| r.acked.map(|t| ms(t - r.slot)))
        .collect();
    if !a.dump.is_empty() {
        let mut s = String::new();
        for r in rows {
            let line = serde_json::json!({
                "id": r.id, "slot": r.slot, "send": r.send, "rtt_end": r.rtt_end,
                "code": r.code, "received": r.received, "dispatched": r.dispatched,
                "acked": r.acked,
            });
            s.push_str(&line.to_string());
            s.push('\n');
        }
        std::fs::write(&a.dump, s).map_err(|e| format!("--dump {}: {e}", a.dump))?;
    }
    let span = last_ack - first_send;
    let post_span = rows
        .iter()
        .map(|r| r.rtt_end)
        .fold(f64::NEG_INFINITY, f64::max)
        - first_send;
    let mut lost: std::collections::HashSet<&str> = created
        .iter()
        .filter(|r| r.acked.is_none())
        .filter_map(|r| r.id.as_deref())
        .collect();
    let (mut dup, mut printed) = (serde_json::Value::Null, serde_json::Value::Null);
    if !a.store_out.is_empty() {
        let mut counts: HashMap<String, usize> = HashMap::new();
        for f in glob_files(&a.store_out) {
            let Ok(text) = std::fs::read(&f) else {
                continue;
            };
            for ln in String::from_utf8_lossy(&text).lines() {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(ln)
                    && let Some(id) = v.get("id").and_then(|x| x.as_str())
                {
                    *counts.entry(id.to_string()).or_default() += 1;
                }
            }
        }
        let count = |r: &Rec| {
            r.id.as_deref()
                .and_then(|id| counts.get(id))
                .copied()
                .unwrap_or(0)
        };
        dup = created.iter().filter(|r| count(r) > 1).count().into();
        printed = created.iter().filter(|r| count(r) >= 1).count().into();
        lost.extend(
            created
                .iter()
                .filter(|r| count(r) == 0)
                .filter_map(|r| r.id.as_deref()),
        );
    }
    let multi_ack = acked.iter().filter(|r| r.acks.unwrap_or(0) > 1).count();
    let rate = |n: usize, s: f64| {
        if s > 0.0 {
            serde_json::json!(r1(n as f64 / s))
        } else {
            serde_json::Value::Null
        }
    };
    let maxv = |xs: &[f64]| xs.iter().copied().reduce(f64::max);
    let res = serde_json::json!({
        "label": a.label,
        "orders": a.orders,
        "stores": a.stores,
        "target_rate": a.rate,
        "created": created.len(),
        "post_failed": failed,
        "acked": acked.len(),
        "lost": lost.len(),
        "dup": dup,
        "printed_by_stores": printed,
        "acks_more_than_once": multi_ack,
        "post_rate": rate(created.len(), post_span),
        "orders_per_sec": rate(acked.len(), span),
        "p50_ms": r2(pct(&mut lat, 50.0)),
        "p99_ms": r2(pct(&mut lat, 99.0)),
        "max_ms": r2(maxv(&lat)),
        "post_rtt_p50_ms": r2(pct(&mut rtt, 50.0)),
        "post_rtt_p99_ms": r2(pct(&mut rtt, 99.0)),
        "server_p50_ms": r2(pct(&mut srv, 50.0)),
        "server_p99_ms": r2(pct(&mut srv, 99.0)),
        "late_p50_ms": r2(pct(&mut late, 50.0)),
        "late_p99_ms": r2(pct(&mut late, 99.0)),
        "late_max_ms": r2(maxv(&late)),
        "sched_p50_ms": r2(pct(&mut sched, 50.0)),
        "sched_p99_ms": r2(pct(&mut sched, 99.0)),
        "gen_cpu_s": r2(Some(gen_cpu)),
        "seconds": (span * 1000.0).round() / 1000.0,
        "generator": "rust",
    });
    let g = |k: &str| res.get(k).map(|v| v.to_string()).unwrap_or_default();
    eprintln!(
        "{}: {}/{} acked, lost {}, dup {}, {} orders/s (POSTs at {}/s), latency p50 {} ms p99 {} ms \
         (POST rtt p50 {} p99 {}; server received->accepted p50 {} p99 {}; sends late p50 {} p99 {} \
         max {} ms, from the schedule p50 {} p99 {}; generator {:.2} CPU-s)",
        a.label,
        acked.len(),
        a.orders,
        g("lost"),
        g("dup"),
        g("orders_per_sec"),
        g("post_rate"),
        g("p50_ms"),
        g("p99_ms"),
        g("post_rtt_p50_ms"),
        g("post_rtt_p99_ms"),
        g("server_p50_ms"),
        g("server_p99_ms"),
        g("late_p50_ms"),
        g("late_p99_ms"),
        g("late_max_ms"),
        g("sched_p50_ms"),
        g("sched_p99_ms"),
        gen_cpu
    );
    println!("{res}");
    Ok(())
}
