//! The durable outbox: QoS 1 and 2 messages written to disk before `publish` accepts them, and
//! marked done when the broker acknowledges (or refuses) them. A client started on the same
//! outbox sends again whatever was never acknowledged, so a message survives the process.
//!
//! The file is a log of records, each `len: u32 | checksum: u32 | kind: u8 | id: u64 | body`
//! (little endian; the checksum is FNV-1a over kind, id and body). `kind` 1 is a message, its
//! body the PUBLISH encoded as MQTT 5.0 (properties kept); `kind` 2 marks message `id` done. A
//! torn or corrupt tail, from a crash during a write, ends the log. Opening compacts it.
//!
//! Delivery across a restart is at least once: the new process does not have the old
//! connection's packet identifiers, so a message the broker received but never acknowledged to
//! us is sent again as a new message ([`crate::ClientEvent::Republished`]).

use bytes::{Buf, BufMut, BytesMut};
use qosmos_mqtt::{Encoder, Packet, PacketId, ProtocolVersion, Publish, QoS, Role, decode_packet};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

const MESSAGE: u8 = 1;
const DONE: u8 = 2;
const HEADER: usize = 8;
/// Truncate the log once nothing is live and it is at least this big.
const TRUNCATE_AT: u64 = 1 << 20;

#[derive(Debug)]
pub(crate) struct Outbox {
    path: PathBuf,
    file: File,
    next_id: u64,
    live: usize,
    size: u64,
}

fn fnv1a(parts: &[&[u8]]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for part in parts {
        for b in *part {
            h ^= u32::from(*b);
            h = h.wrapping_mul(0x0100_0193);
        }
    }
    h
}

fn record(kind: u8, id: u64, body: &[u8]) -> Vec<u8> {
    let mut head = [0u8; 9];
    head[0] = kind;
    head[1..].copy_from_slice(&id.to_le_bytes());
    let len = (head.len() + body.len()) as u32;
    let mut out = Vec::with_capacity(HEADER + len as usize);
    out.put_u32_le(len);
    out.put_u32_le(fnv1a(&[&head, body]));
    out.extend_from_slice(&head);
    out.extend_from_slice(body);
    out
}

/// Parses a log; stops at the first torn or corrupt record.
fn parse(mut data: &[u8]) -> BTreeMap<u64, Publish> {
    let mut live = BTreeMap::new();
    while data.len() >= HEADER {
        let len = (&data[..4]).get_u32_le() as usize;
        let sum = (&data[4..8]).get_u32_le();
        if len < 9 || data.len() < HEADER + len {
            break;
        }
        let body = &data[HEADER..HEADER + len];
        if fnv1a(&[body]) != sum {
            tracing::warn!("outbox: corrupt record, ignoring the rest of the log");
            break;
        }
        let kind = body[0];
        let id = (&body[1..9]).get_u64_le();
        match kind {
            MESSAGE => match decode_packet(&body[9..], Role::Client, Some(ProtocolVersion::V5)) {
                Ok(Packet::Publish(mut p)) => {
                    p.packet_id = None;
                    p.dup = false;
                    live.insert(id, p);
                }
                _ => tracing::warn!(id, "outbox: undecodable message skipped"),
            },
            DONE => {
                live.remove(&id);
            }
            _ => tracing::warn!(kind, "outbox: unknown record skipped"),
        }
        data = &data[HEADER + len..];
    }
    live
}

impl Outbox {
    /// Opens (creating) the outbox file at `path`, compacts it, and returns it with the
    /// messages never acknowledged, oldest first.
    pub(crate) fn open(path: &Path) -> io::Result<(Outbox, Vec<(u64, Publish)>)> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let mut data = Vec::new();
        match File::open(path) {
            Ok(mut f) => {
                f.read_to_end(&mut data)?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let live = parse(&data);
        let next_id = live.keys().next_back().map_or(1, |k| k + 1);
        // Compact: write the live messages to a new file and put it in place atomically.
        let tmp = path.with_extension("compact");
        let mut size = 0u64;
        {
            let mut f = File::create(&tmp)?;
            let mut buf = Vec::new();
            for (id, p) in &live {
                buf.extend(record(MESSAGE, *id, &encode(p)?));
            }
            f.write_all(&buf)?;
            f.sync_all()?;
            size += buf.len() as u64;
        }
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // Make the rename itself durable; not every platform can open a directory.
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        let file = OpenOptions::new().append(true).open(path)?;
        let outbox = Outbox {
            path: path.to_owned(),
            file,
            next_id,
            live: live.len(),
            size,
        };
        Ok((outbox, live.into_iter().collect()))
    }

    /// Writes a message and waits for the disk; returns its id.
    pub(crate) fn append(&mut self, msg: &Publish) -> io::Result<u64> {
        let id = self.next_id;
        let rec = record(MESSAGE, id, &encode(msg)?);
        self.file.write_all(&rec)?;
        self.file.sync_data()?;
        self.next_id += 1;
        self.live += 1;
        self.size += rec.len() as u64;
        Ok(id)
    }

    /// Marks a message done (acknowledged or refused). Not synced: if this is lost in a crash,
    /// the message is sent once more, which at least once allows.
    pub(crate) fn done(&mut self, id: u64) -> io::Result<()> {
        self.live = self.live.saturating_sub(1);
        if self.live == 0 && self.size >= TRUNCATE_AT {
            self.file.set_len(0)?;
            self.file.sync_data()?;
            self.size = 0;
            return Ok(());
        }
        let rec = record(DONE, id, &[]);
        self.file.write_all(&rec)?;
        self.size += rec.len() as u64;
        Ok(())
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

fn encode(p: &Publish) -> io::Result<Vec<u8>> {
    let mut p = p.clone();
    p.dup = false;
    p.packet_id = (p.qos != QoS::AtMostOnce).then_some(PacketId::MIN);
    let mut buf = BytesMut::new();
    Encoder::new(ProtocolVersion::V5)
        .encode(&Packet::Publish(p), &mut buf)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    Ok(buf.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(n: u8) -> Publish {
        let mut p = Publish::new("orders/1", vec![n]);
        p.qos = QoS::ExactlyOnce;
        p.properties.set_content_type("application/json");
        p
    }

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("qosmos-outbox-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn live_messages_survive_reopen_with_their_properties() -> io::Result<()> {
        let path = dir("reopen").join("outbox.log");
        let (mut ob, live) = Outbox::open(&path)?;
        assert!(live.is_empty());
        let a = ob.append(&msg(1))?;
        let b = ob.append(&msg(2))?;
        let c = ob.append(&msg(3))?;
        ob.done(b)?;
        drop(ob);
        let (mut ob, live) = Outbox::open(&path)?;
        let ids: Vec<_> = live.iter().map(|(id, _)| *id).collect();
        assert_eq!(ids, [a, c]);
        assert_eq!(live[0].1.payload.as_ref(), [1]);
        assert_eq!(live[0].1.qos, QoS::ExactlyOnce);
        assert_eq!(
            live[0].1.properties.content_type().map(|s| s.as_str()),
            Some("application/json")
        );
        // New ids continue after the old ones.
        assert!(ob.append(&msg(4))? > c);
        Ok(())
    }

    #[test]
    fn a_torn_tail_is_ignored() -> io::Result<()> {
        let path = dir("torn").join("outbox.log");
        let (mut ob, _) = Outbox::open(&path)?;
        ob.append(&msg(1))?;
        ob.append(&msg(2))?;
        drop(ob);
        let len = std::fs::metadata(&path)?.len();
        let f = OpenOptions::new().write(true).open(&path)?;
        f.set_len(len - 3)?;
        let (_, live) = Outbox::open(&path)?;
        assert_eq!(live.len(), 1);
        Ok(())
    }
}
