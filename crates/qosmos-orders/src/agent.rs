//! The store agent behind `qosmos store`: receives its orders at QoS 2, handles each once,
//! acknowledges it.
//!
//! For each order on `orders/{store_id}`:
//! 1. If the [`Journal`] knows its id, it was handled before (the service dispatched it
//!    again because the ack was lost or late): the same ack is sent again, nothing else.
//! 2. Otherwise, without `--exec`: the outcome `accepted` is written to the journal, then the
//!    order JSON is printed as one line on stdout (and flushed), then the journal is synced.
//!    With `--exec CMD`: `started` is recorded (synced), the order JSON is printed as one
//!    line on stdout, CMD runs once with the order JSON on stdin, and its outcome is
//!    recorded (exit 0 accepts; anything else rejects, with CMD's stderr as the reason).
//!    CMD's stdout goes to the agent's stderr, so that the agent's stdout is one order
//!    JSON line per order with or without `--exec`.
//! 3. The ack `{"order_id", "status", "reason"?}` is published at QoS 2 on
//!    `acks/{store_id}`, and the agent waits for PUBCOMP.
//! 4. Only then is the message let go (the handler returns, or the task holding it ends),
//!    and the client acknowledges the order to the broker (PUBREC): until that point a
//!    crash makes the broker deliver the order again.
//!
//! Recording before printing makes printing at most once: the journal line is written,
//! then the order line, then the journal is synced (before the ack). A SIGKILL between
//! the two `write` calls loses that one order's line; none can make the agent print an
//! order twice. (Printing first would repeat the line whenever a kill landed before the
//! journal write.) After a power cut, the journal is as of the last sync, and an order
//! printed but not yet acknowledged may be printed again. An `--exec` order found
//! `started` after a restart is not run again (it may have done its work): it is rejected
//! with a reason saying so, which makes the store's staff look at it.
//!
//! Group flush (without `--exec`): orders are not handled one at a time. The route hands
//! each order, in arrival order, to one flusher thread and returns, so the next order is
//! read at once; the flusher takes every order waiting, writes and prints them in that
//! order, syncs the journal ONCE (`fdatasync`) for the group, and only then lets their acks
//! go (orders arriving during a sync join the next group). Each order's ack and its
//! acknowledgement to the broker still come after its journal line is on disk. With
//! `--exec`, orders are handled one at a time, in order, as before.
//!
//! The agent keeps a persistent session (client id `qosmos-store-{store_id}`, clean start
//! off, 30-day session expiry), so orders published while it is down wait in the broker.

use std::io::Write as _;
use std::os::fd::AsFd as _;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use qosmos_client::mqtt::{Publish, QoS};
use qosmos_client::{Client, ClientError, ClientOptions, Message, SubscribeOutcome};
use tokio::io::AsyncWriteExt as _;
use tokio::sync::oneshot;

use crate::journal::{Handled, Journal};
use crate::model::{Ack, AckOutcome, Order, StoreId};

/// How long the broker keeps the agent's session while it is away: 30 days.
pub const SESSION_EXPIRY_SECS: u32 = 30 * 24 * 3600;

/// The longest reason taken from an `--exec` command's stderr, in characters.
pub const MAX_REASON_CHARS: usize = 1000;

/// What the agent is for.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The store.
    pub store_id: StoreId,
    /// Where the journal lives.
    pub data_dir: PathBuf,
    /// A shell command to run per order instead of printing it.
    pub exec: Option<String>,
}

/// Why the agent could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// The journal could not be opened.
    #[error("journal in {dir}: {source}")]
    Journal {
        /// The data directory.
        dir: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The MQTT client failed to start.
    #[error(transparent)]
    Client(#[from] ClientError),
}

/// A running store agent.
#[derive(Debug)]
pub struct Agent {
    client: Client,
}

/// The client options the agent uses on top of `base` (the broker's address and
/// credentials): its fixed client id, a persistent session.
pub fn client_options(base: ClientOptions, store_id: &StoreId) -> ClientOptions {
    base.client_id(format!("qosmos-store-{store_id}"))
        .clean_start(false)
        .session_expiry(SESSION_EXPIRY_SECS)
        .keep_alive(30)
        .receive_maximum(64)
}

impl Agent {
    /// Opens the journal, connects (see [`client_options`]), and subscribes to
    /// `orders/{store_id}` at QoS 2 in the background (a downgrade is logged as a warning).
    ///
    /// # Errors
    ///
    /// When the journal cannot be opened or the broker refuses the connection.
    pub async fn start(config: AgentConfig, base: ClientOptions) -> Result<Agent, AgentError> {
        let journal = Journal::open(&config.data_dir).map_err(|source| AgentError::Journal {
            dir: config.data_dir.display().to_string(),
            source,
        })?;
        tracing::info!(path = %journal.path().display(), handled = journal.len(), "journal opened");
        let opts = client_options(base, &config.store_id);
        let topic = format!("orders/{}", config.store_id);
        let journal = Arc::new(Mutex::new(journal));
        // Without --exec, one thread journals and prints the orders, a group at a time.
        let flusher = match config.exec {
            None => {
                Some(
                    Flusher::start(journal.clone()).map_err(|source| AgentError::Journal {
                        dir: config.data_dir.display().to_string(),
                        source,
                    })?,
                )
            }
            Some(_) => None,
        };
        // The route goes on before the connection can deliver: the broker resends a resumed
        // session's unacknowledged orders at once.
        let register = |client: &Client, mqtt5: bool| {
            let handler = Arc::new(Handler {
                client: client.clone(),
                journal: journal.clone(),
                flusher: flusher.clone(),
                ack_topic: format!("acks/{}", config.store_id),
                store_id: config.store_id.clone(),
                exec: config.exec.clone(),
                mqtt5,
            });
            client.route(&topic, move |msg| {
                let h = handler.clone();
                // Without --exec the order is queued to the flusher here, in arrival order,
                // and the rest runs on a task: the route returns and the next order is read.
                // With --exec, one order at a time in the route.
                let inline = Handler::queue(&h, msg);
                async move {
                    if let Some(msg) = inline {
                        h.handle(msg).await;
                    }
                }
            });
        };
        let (client, _mqtt5) = crate::service::connect_routed(opts, register).await?;
        let c = client.clone();
        tokio::spawn(async move {
            match c.subscribe(&topic, QoS::ExactlyOnce).await {
                Ok(SubscribeOutcome::Granted(q)) => {
                    tracing::info!(topic, qos = q.as_u8(), "subscribed");
                }
                Ok(SubscribeOutcome::Downgraded { granted, .. }) => tracing::warn!(
                    topic,
                    granted = granted.as_u8(),
                    "THE BROKER GRANTED LESS THAN QoS 2: orders may be lost or repeated in transit"
                ),
                Err(e) => {
                    tracing::error!(topic, error = %e, "subscribing failed: no orders will arrive")
                }
            }
        });
        Ok(Agent { client })
    }

    /// The MQTT client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Disconnects, after the orders being handled (if any) are acknowledged.
    pub async fn stop(self) {
        self.client.disconnect().await;
    }
}

struct Handler {
    client: Client,
    journal: Arc<Mutex<Journal>>,
    flusher: Option<Flusher>,
    ack_topic: String,
    store_id: StoreId,
    exec: Option<String>,
    mqtt5: bool,
}

impl Handler {
    /// Without `--exec`: queues the order to the flusher and spawns the wait for its flush
    /// and the ack; the message (and with it the acknowledgement to the broker) is held by
    /// that task until the ack is delivered. With `--exec`: gives the message back.
    fn queue(me: &Arc<Handler>, msg: Message) -> Option<Message> {
        let Some(flusher) = &me.flusher else {
            return Some(msg);
        };
        let order = me.parse(&msg)?;
        tracing::debug!(target: crate::STAGE_TARGET, order_id = %order.id, stage = "order_in");
        let (reply, done) = oneshot::channel();
        flusher.send(order.clone(), reply);
        let me = me.clone();
        tokio::spawn(async move {
            let Ok((status, reason)) = done.await else {
                // The flusher is gone (it exits the process on a journal failure): no ack,
                // no acknowledgement; the broker delivers the order again after a restart.
                std::mem::forget(msg);
                return;
            };
            tracing::debug!(target: crate::STAGE_TARGET, order_id = %order.id, stage = "synced");
            me.ack(&order, status, reason).await;
            drop(msg);
        });
        None
    }

    /// The order in `msg`, if it is one for this store (else logged and dropped).
    fn parse(&self, msg: &Message) -> Option<Order> {
        let order: Order = match serde_json::from_slice(&msg.payload) {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(topic = %msg.topic, error = %e,
                    payload = %String::from_utf8_lossy(&msg.payload),
                    "not an order: dropped");
                return None;
            }
        };
        if order.store_id != self.store_id {
            tracing::error!(order_id = %order.id, store_id = %order.store_id,
                "an order for another store on our topic: dropped");
            return None;
        }
        Some(order)
    }

    async fn handle(&self, msg: Message) {
        let Some(order) = self.parse(&msg) else {
            return;
        };
        let known = self.lookup(&order).await;
        let (status, reason) = match known {
            Some(Handled::Done { status, reason }) => {
                tracing::info!(order_id = %order.id, "order handled before: sending its ack again");
                (status, reason)
            }
            Some(Handled::Started) => {
                let reason = "the agent stopped while --exec ran for this order; not run again \
                              so that it is not handled twice"
                    .to_owned();
                tracing::warn!(order_id = %order.id, "{reason}");
                match self
                    .record(&order, AckOutcome::Rejected, Some(reason.clone()))
                    .await
                {
                    Ok(()) => (AckOutcome::Rejected, Some(reason)),
                    Err(()) => return,
                }
            }
            None => match self.first_time(&order).await {
                Ok(outcome) => outcome,
                Err(()) => return,
            },
        };
        self.ack(&order, status, reason).await;
    }

    async fn lookup(&self, order: &Order) -> Option<Handled> {
        self.journal
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&order.id)
            .cloned()
    }

    /// Writes `h` to the journal (on a blocking thread: it syncs to disk). On failure the
    /// error is logged and the process exits: going on could handle the order twice.
    async fn write(&self, order: &Order, h: Handled) -> Result<(), ()> {
        let journal = self.journal.clone();
        let id = order.id.clone();
        let res = tokio::task::spawn_blocking(move || {
            journal
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .record(&id, h)
        })
        .await;
        match res {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                tracing::error!(order_id = %order.id, error = %e, "cannot write the journal: stopping");
                std::process::exit(1);
            }
            Err(e) => {
                tracing::error!(order_id = %order.id, error = %e, "journal write task failed");
                Err(())
            }
        }
    }

    async fn record(
        &self,
        order: &Order,
        status: AckOutcome,
        reason: Option<String>,
    ) -> Result<(), ()> {
        self.write(order, Handled::Done { status, reason }).await
    }

    async fn first_time(&self, order: &Order) -> Result<(AckOutcome, Option<String>), ()> {
        // Only --exec orders are handled here; the others go to the flusher.
        let Some(cmd) = &self.exec else {
            return Err(());
        };
        self.write(order, Handled::Started).await?;
        // Printed once `started` is on disk: after a crash from here on, the journal says
        // `started` and the order is neither run nor printed again.
        let mut line = order.to_payload();
        line.push(b'\n');
        print_lines(&line);
        let payload = line.strip_suffix(b"\n").unwrap_or(&line);
        let (status, reason) = run_exec(cmd, payload).await;
        tracing::info!(order_id = %order.id, ?status, reason = reason.as_deref().unwrap_or(""), "--exec finished");
        self.record(order, status, reason.clone()).await?;
        Ok((status, reason))
    }

    async fn ack(&self, order: &Order, status: AckOutcome, reason: Option<String>) {
        let ack = Ack {
            order_id: order.id.clone(),
            status,
            reason,
        };
        let payload = serde_json::to_vec(&ack).unwrap_or_default();
        let mut p = Publish::new(self.ack_topic.as_str(), Bytes::from(payload));
        p.qos = QoS::ExactlyOnce;
        if self.mqtt5 {
            p.properties.set_content_type("application/json");
            p.properties
                .set_correlation_data(Bytes::copy_from_slice(order.id.as_str().as_bytes()));
        }
        match self.client.publish(p).await {
            Ok(_) => {
                tracing::debug!(target: crate::STAGE_TARGET, order_id = %order.id, stage = "ack_pubcomp");
                tracing::debug!(order_id = %order.id, ?status, "ack delivered (PUBCOMP)");
            }
            // The service dispatches the order again after its ack timeout; the journal
            // then sends this same ack again.
            Err(e) => tracing::warn!(order_id = %order.id, error = %e, "publishing the ack failed"),
        }
    }
}

/// The most orders journaled with one sync.
const MAX_FLUSH: usize = 256;

/// An order for the flusher, and where its outcome goes once it is on disk.
type FlushRequest = (Order, oneshot::Sender<(AckOutcome, Option<String>)>);

/// Journals and prints orders (without `--exec`) on a thread of its own, a group at a
/// time: the journal lines of the orders waiting are written (one write), then their order
/// lines printed (one write, in arrival order; so a SIGKILL can lose a printed line, never
/// repeat one); then ONE `fdatasync` covers the group, and only then is any of them
/// answered (and so acknowledged). The group's answers go back to the runtime as one
/// message, handed out there: one wake-up of the runtime per group, not one per order. Orders that arrive during a sync join the next group. An order the
/// journal already knows (a redispatch, even one queued in the same group) is not printed
/// again: it is answered with its recorded outcome.
#[derive(Debug, Clone)]
struct Flusher {
    tx: std::sync::mpsc::Sender<FlushRequest>,
}

impl Flusher {
    fn start(journal: Arc<Mutex<Journal>>) -> std::io::Result<Flusher> {
        let (tx, rx) = std::sync::mpsc::channel();
        let (answers_tx, mut answers_rx) = tokio::sync::mpsc::unbounded_channel::<Vec<Answer>>();
        tokio::spawn(async move {
            while let Some(group) = answers_rx.recv().await {
                for (reply, answer) in group {
                    let _ = reply.send(answer);
                }
            }
        });
        std::thread::Builder::new()
            .name("journal-flusher".into())
            .spawn(move || {
                // Any way out of the loop but the agent's end (a panic included) would leave
                // every later order held unacknowledged, silently: end the process instead;
                // the broker delivers what was not acknowledged again after a restart.
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    flush_loop(&journal, &rx, &answers_tx);
                }));
                if outcome.is_err() {
                    eprintln!(
                        "qosmos: the journal flusher failed; exiting so that nothing is held"
                    );
                    std::process::exit(1);
                }
            })?;
        Ok(Flusher { tx })
    }

    /// Queues `order`; `reply` gets its outcome once it is synced. If the flusher is gone,
    /// `reply` is dropped unanswered.
    fn send(&self, order: Order, reply: oneshot::Sender<(AckOutcome, Option<String>)>) {
        let _ = self.tx.send((order, reply));
    }
}

/// An order's outcome and where it goes.
type Answer = (
    oneshot::Sender<(AckOutcome, Option<String>)>,
    (AckOutcome, Option<String>),
);

fn flush_loop(
    journal: &Mutex<Journal>,
    rx: &std::sync::mpsc::Receiver<FlushRequest>,
    answers_tx: &tokio::sync::mpsc::UnboundedSender<Vec<Answer>>,
) {
    let mut batch = Vec::with_capacity(MAX_FLUSH);
    let mut answers = Vec::with_capacity(MAX_FLUSH);
    let mut printed = Vec::new();
    while let Ok(first) = rx.recv() {
        batch.push(first);
        while batch.len() < MAX_FLUSH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let mut j = journal.lock().unwrap_or_else(|e| e.into_inner());
        // The batch's order lines, printed in one write once their journal lines are in the
        // file (so that a SIGKILL after the print finds them there).
        printed.clear();
        let mut appended = false;
        for (order, reply) in batch.drain(..) {
            let fail = |e: std::io::Error| -> ! {
                tracing::error!(order_id = %order.id, error = %e, "cannot write the journal: stopping");
                std::process::exit(1);
            };
            let answer = match j.get(&order.id).cloned() {
                Some(Handled::Done { status, reason }) => {
                    tracing::info!(order_id = %order.id, "order handled before: sending its ack again");
                    (status, reason)
                }
                Some(Handled::Started) => {
                    let reason = "the agent stopped while --exec ran for this order; not run \
                                  again so that it is not handled twice"
                        .to_owned();
                    tracing::warn!(order_id = %order.id, "{reason}");
                    let h = Handled::Done {
                        status: AckOutcome::Rejected,
                        reason: Some(reason.clone()),
                    };
                    j.append(&order.id, h).unwrap_or_else(|e| fail(e));
                    appended = true;
                    (AckOutcome::Rejected, Some(reason))
                }
                None => {
                    let h = Handled::Done {
                        status: AckOutcome::Accepted,
                        reason: None,
                    };
                    j.append(&order.id, h).unwrap_or_else(|e| fail(e));
                    appended = true;
                    printed.extend_from_slice(&order.to_payload());
                    printed.push(b'\n');
                    // DEBUG: the order line on stdout is the record.
                    tracing::debug!(order_id = %order.id, "order printed");
                    (AckOutcome::Accepted, None)
                }
            };
            answers.push((reply, answer));
        }
        if let Err(e) = j.write_out() {
            tracing::error!(error = %e, "cannot write the journal: stopping");
            std::process::exit(1);
        }
        if !printed.is_empty() {
            print_lines(&printed);
        }
        if appended && let Err(e) = j.sync() {
            tracing::error!(error = %e, "cannot sync the journal: stopping");
            std::process::exit(1);
        }
        drop(j);
        // The runtime gone (the agent is stopping): the replies are dropped unanswered.
        let _ = answers_tx.send(std::mem::replace(
            &mut answers,
            Vec::with_capacity(MAX_FLUSH),
        ));
    }
}

/// Writes order lines (each ending in a newline) to stdout in one write, and flushes.
fn print_lines(lines: &[u8]) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(lines).and_then(|()| out.flush()) {
        tracing::error!(error = %e, "printing orders failed");
    }
}

/// Runs `cmd` through `sh -c` with `input` on stdin: exit 0 accepts; anything else rejects
/// with the command's stderr (or its exit status) as the reason. The command's stdout goes
/// to the agent's stderr: the agent's stdout stays one order JSON line per order.
async fn run_exec(cmd: &str, input: &[u8]) -> (AckOutcome, Option<String>) {
    let stdout = match std::io::stderr().as_fd().try_clone_to_owned() {
        Ok(fd) => Stdio::from(fd),
        Err(_) => Stdio::null(),
    };
    let child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdin(Stdio::piped())
        .stdout(stdout)
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            return (
                AckOutcome::Rejected,
                Some(format!("--exec could not start: {e}")),
            );
        }
    };
    if let Some(mut stdin) = child.stdin.take() {
        // A command that does not read its input may close stdin early: not an error.
        let _ = stdin.write_all(input).await;
        let _ = stdin.write_all(b"\n").await;
        drop(stdin);
    }
    match child.wait_with_output().await {
        Ok(out) if out.status.success() => (AckOutcome::Accepted, None),
        Ok(out) => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let mut reason: String = stderr.trim().chars().take(MAX_REASON_CHARS).collect();
            if reason.is_empty() {
                reason = format!("--exec failed: {}", out.status);
            }
            (AckOutcome::Rejected, Some(reason))
        }
        Err(e) => (
            AckOutcome::Rejected,
            Some(format!("--exec could not be waited for: {e}")),
        ),
    }
}
