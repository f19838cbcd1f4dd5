//! The store agent behind `qosmos store`: receives its orders at QoS 2, handles each once,
//! acknowledges it.
//!
//! For each order on `orders/{store_id}`:
//! 1. If the [`Journal`] knows its id, it was handled before (the service dispatched it
//!    again because the ack was lost or late): the same ack is sent again, nothing else.
//! 2. Otherwise, without `--exec`: the outcome `accepted` is recorded durably, then the order
//!    JSON is printed as one line on stdout (and flushed). With `--exec CMD`: `started` is
//!    recorded, CMD runs once with the order JSON on stdin, and its outcome is recorded
//!    (exit 0 accepts; anything else rejects, with CMD's stderr as the reason).
//! 3. The ack `{"order_id", "status", "reason"?}` is published at QoS 2 on
//!    `acks/{store_id}`, and the agent waits for PUBCOMP.
//! 4. Only then does the handler return, and the client acknowledge the order to the broker
//!    (PUBREC): until that point a crash makes the broker deliver the order again.
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
//! The agent keeps a persistent session (client id `qosmos-store-{store_id}`, clean start
//! off, 30-day session expiry), so orders published while it is down wait in the broker.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use qosmos_client::mqtt::{Publish, QoS};
use qosmos_client::{Client, ClientError, ClientOptions, Message, SubscribeOutcome};
use tokio::io::AsyncWriteExt as _;

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
        .receive_maximum(16)
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
        // The route goes on before the connection can deliver: the broker resends a resumed
        // session's unacknowledged orders at once.
        let register = |client: &Client, mqtt5: bool| {
            let handler = Arc::new(Handler {
                client: client.clone(),
                journal: journal.clone(),
                ack_topic: format!("acks/{}", config.store_id),
                store_id: config.store_id.clone(),
                exec: config.exec.clone(),
                mqtt5,
            });
            client.route(&topic, move |msg| {
                let h = handler.clone();
                async move { h.handle(msg).await }
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

    /// Disconnects, after the order being handled (if any) is acknowledged.
    pub async fn stop(self) {
        self.client.disconnect().await;
    }
}

struct Handler {
    client: Client,
    journal: Arc<Mutex<Journal>>,
    ack_topic: String,
    store_id: StoreId,
    exec: Option<String>,
    mqtt5: bool,
}

impl Handler {
    async fn handle(&self, msg: Message) {
        let order: Order = match serde_json::from_slice(&msg.payload) {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(topic = %msg.topic, error = %e,
                    payload = %String::from_utf8_lossy(&msg.payload),
                    "not an order: dropped");
                return;
            }
        };
        if order.store_id != self.store_id {
            tracing::error!(order_id = %order.id, store_id = %order.store_id,
                "an order for another store on our topic: dropped");
            return;
        }
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
        let Some(cmd) = &self.exec else {
            // The journal line, then the order line, then the sync, in one blocking call.
            // A SIGKILL cannot undo a write() that returned (the page cache outlives the
            // process), so the only moment a kill loses the order's line (recorded, not
            // printed) is between these two write() calls; it can never print it twice.
            // The sync comes before the ack and the MQTT acknowledgement.
            let journal = self.journal.clone();
            let id = order.id.clone();
            let mut line = order.to_payload();
            line.push(b'\n');
            let done = tokio::task::spawn_blocking(move || {
                let mut journal = journal.lock().unwrap_or_else(|e| e.into_inner());
                let mut out = std::io::stdout().lock();
                journal
                    .append(
                        &id,
                        Handled::Done {
                            status: AckOutcome::Accepted,
                            reason: None,
                        },
                    )
                    .map_err(|e| (true, e))?;
                let printed = out.write_all(&line).and_then(|()| out.flush());
                journal.sync().map_err(|e| (true, e))?;
                printed.map_err(|e| (false, e))
            })
            .await;
            match done {
                Ok(Ok(())) => tracing::info!(order_id = %order.id, "order printed"),
                Ok(Err((true, e))) => {
                    tracing::error!(order_id = %order.id, error = %e, "cannot write the journal: stopping");
                    std::process::exit(1);
                }
                Ok(Err((false, e))) => {
                    tracing::error!(order_id = %order.id, error = %e, "printing the order failed");
                }
                Err(e) => {
                    tracing::error!(order_id = %order.id, error = %e, "the journal and print task failed");
                    return Err(());
                }
            }
            return Ok((AckOutcome::Accepted, None));
        };
        self.write(order, Handled::Started).await?;
        let (status, reason) = run_exec(cmd, &order.to_payload()).await;
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
            Ok(_) => tracing::debug!(order_id = %order.id, ?status, "ack delivered (PUBCOMP)"),
            // The service dispatches the order again after its ack timeout; the journal
            // then sends this same ack again.
            Err(e) => tracing::warn!(order_id = %order.id, error = %e, "publishing the ack failed"),
        }
    }
}

/// Runs `cmd` through `sh -c` with `input` on stdin: exit 0 accepts; anything else rejects
/// with the command's stderr (or its exit status) as the reason.
async fn run_exec(cmd: &str, input: &[u8]) -> (AckOutcome, Option<String>) {
    let child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdin(Stdio::piped())
        .stdout(Stdio::inherit())
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
