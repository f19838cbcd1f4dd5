//! The subscription registry: every topic filter the application asked for, with all of its
//! options, so that a lost session is restored exactly as it was (the seed's bug was keeping
//! the filter and forgetting its QoS).

use qosmos_mqtt::{QoS, ReasonCode, RetainHandling, SubscriptionOptions};
use std::collections::{BTreeMap, BTreeSet};

/// Everything a subscription asks for: the options byte of SUBSCRIBE (QoS and the 5.0 options)
/// and an optional Subscription Identifier (5.0).
///
/// A bare [`QoS`] converts into it, so `client.subscribe("TEST", QoS::ExactlyOnce)` works.
///
/// ```
/// use qosmos_client::SubscribeOptions;
/// use qosmos_mqtt::{QoS, RetainHandling};
///
/// let opts = SubscribeOptions::new(QoS::ExactlyOnce)
///     .no_local(true)
///     .retain_handling(RetainHandling::DoNotSend);
/// assert_eq!(opts.qos, QoS::ExactlyOnce);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SubscribeOptions {
    /// The maximum QoS wanted.
    pub qos: QoS,
    /// Do not receive our own messages (5.0).
    pub no_local: bool,
    /// Keep the retain flag as published (5.0).
    pub retain_as_published: bool,
    /// When retained messages are sent (5.0).
    pub retain_handling: RetainHandling,
    /// A Subscription Identifier to attach (5.0, 1 to 268,435,455).
    pub subscription_identifier: Option<u32>,
}

impl SubscribeOptions {
    /// Options with this QoS and every 5.0 option at its default.
    pub fn new(qos: QoS) -> SubscribeOptions {
        SubscribeOptions {
            qos,
            ..Default::default()
        }
    }

    /// Sets No Local (5.0).
    pub fn no_local(mut self, v: bool) -> Self {
        self.no_local = v;
        self
    }

    /// Sets Retain As Published (5.0).
    pub fn retain_as_published(mut self, v: bool) -> Self {
        self.retain_as_published = v;
        self
    }

    /// Sets Retain Handling (5.0).
    pub fn retain_handling(mut self, v: RetainHandling) -> Self {
        self.retain_handling = v;
        self
    }

    /// Sets the Subscription Identifier (5.0).
    pub fn subscription_identifier(mut self, id: u32) -> Self {
        self.subscription_identifier = Some(id);
        self
    }

    /// The options byte as the codec wants it.
    pub fn wire_options(&self) -> SubscriptionOptions {
        SubscriptionOptions {
            qos: self.qos,
            no_local: self.no_local,
            retain_as_published: self.retain_as_published,
            retain_handling: self.retain_handling,
        }
    }
}

impl From<QoS> for SubscribeOptions {
    fn from(qos: QoS) -> Self {
        SubscribeOptions::new(qos)
    }
}

/// What the broker granted for one subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscribeOutcome {
    /// The QoS asked for (or more, which a broker should not do but is not a loss).
    Granted(QoS),
    /// Less than asked for: messages will arrive at `granted` at most.
    Downgraded {
        /// The QoS asked for.
        requested: QoS,
        /// The QoS the broker granted.
        granted: QoS,
    },
}

impl SubscribeOutcome {
    /// Compares a SUBACK reason code with the QoS asked for; `Err` with the code for a refusal.
    pub fn from_suback(requested: QoS, code: ReasonCode) -> Result<SubscribeOutcome, ReasonCode> {
        match QoS::from_u8(code.0) {
            Some(granted) if granted < requested => {
                Ok(SubscribeOutcome::Downgraded { requested, granted })
            }
            Some(granted) => Ok(SubscribeOutcome::Granted(granted)),
            None => Err(code),
        }
    }

    /// The QoS granted.
    pub fn granted(&self) -> QoS {
        match *self {
            SubscribeOutcome::Granted(q) => q,
            SubscribeOutcome::Downgraded { granted, .. } => granted,
        }
    }
}

/// What the broker last said about a registered subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscriptionState {
    /// Not acknowledged by the broker in the current session (not sent yet, or SUBACK pending).
    Unconfirmed,
    /// SUBACK granted this.
    Granted(SubscribeOutcome),
    /// SUBACK refused it at the last restore; it is tried again at the next one.
    Refused(ReasonCode),
}

/// One registered subscription, as [`crate::Client::subscriptions`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionInfo {
    /// The topic filter.
    pub filter: String,
    /// The options asked for.
    pub options: SubscribeOptions,
    /// What the broker granted.
    pub state: SubscriptionState,
}

/// The most subscriptions put in one SUBSCRIBE when restoring.
const BATCH: usize = 32;

#[derive(Debug, Default)]
pub(crate) struct Registry {
    entries: BTreeMap<String, (SubscribeOptions, SubscriptionState)>,
    /// Filters removed while the broker may still hold them (unsubscribed while offline, or the
    /// UNSUBSCRIBE was cut off): unsubscribed when a session resumes.
    stale: BTreeSet<String>,
}

impl Registry {
    /// Records (or replaces) a subscription; it is unconfirmed until its SUBACK.
    pub(crate) fn insert(&mut self, filter: &str, options: SubscribeOptions) {
        self.stale.remove(filter);
        self.entries
            .insert(filter.to_owned(), (options, SubscriptionState::Unconfirmed));
    }

    /// Removes a subscription; true if it was registered.
    pub(crate) fn remove(&mut self, filter: &str) -> bool {
        self.entries.remove(filter).is_some()
    }

    /// The broker may still hold `filter` though the application no longer wants it.
    pub(crate) fn mark_stale(&mut self, filter: &str) {
        if !self.entries.contains_key(filter) {
            self.stale.insert(filter.to_owned());
        }
    }

    /// Removes a filter from the registry after a refusal of a direct subscribe, if it still
    /// has the refused options.
    pub(crate) fn forget_if(&mut self, filter: &str, options: &SubscribeOptions) {
        if self.entries.get(filter).is_some_and(|(o, _)| o == options) {
            self.entries.remove(filter);
        }
    }

    /// Records a SUBACK result, if the entry still has the options that were sent.
    pub(crate) fn confirm(
        &mut self,
        filter: &str,
        options: &SubscribeOptions,
        result: Result<SubscribeOutcome, ReasonCode>,
    ) {
        if let Some((o, state)) = self.entries.get_mut(filter)
            && o == options
        {
            *state = match result {
                Ok(outcome) => SubscriptionState::Granted(outcome),
                Err(code) => SubscriptionState::Refused(code),
            };
        }
    }

    /// A connection was established. Returns the subscriptions to send, in batches that each
    /// fit one SUBSCRIBE (same Subscription Identifier, at most [`BATCH`]), and the filters to
    /// unsubscribe.
    ///
    /// Without a session every subscription is sent with its own options, and nothing needs
    /// unsubscribing. With one, only those never acknowledged are sent, and stale filters are
    /// removed.
    pub(crate) fn on_connect(
        &mut self,
        session_present: bool,
    ) -> (Vec<Vec<(String, SubscribeOptions)>>, Vec<String>) {
        let mut unsubscribe = Vec::new();
        if session_present {
            unsubscribe.extend(std::mem::take(&mut self.stale));
        } else {
            self.stale.clear();
            for (_, state) in self.entries.values_mut() {
                *state = SubscriptionState::Unconfirmed;
            }
        }
        let mut groups: BTreeMap<Option<u32>, Vec<(String, SubscribeOptions)>> = BTreeMap::new();
        for (filter, (options, state)) in &self.entries {
            if session_present && *state != SubscriptionState::Unconfirmed {
                continue;
            }
            groups
                .entry(options.subscription_identifier)
                .or_default()
                .push((filter.clone(), *options));
        }
        let batches = groups
            .into_values()
            .flat_map(|group| group.chunks(BATCH).map(<[_]>::to_vec).collect::<Vec<_>>())
            .collect();
        (batches, unsubscribe)
    }

    /// The options registered for `filter`.
    pub(crate) fn options(&self, filter: &str) -> Option<SubscribeOptions> {
        self.entries.get(filter).map(|(o, _)| *o)
    }

    #[cfg(test)]
    pub(crate) fn get(&self, filter: &str) -> Option<(SubscribeOptions, SubscriptionState)> {
        self.entries.get(filter).copied()
    }

    pub(crate) fn list(&self) -> Vec<SubscriptionInfo> {
        self.entries
            .iter()
            .map(|(filter, (options, state))| SubscriptionInfo {
                filter: filter.clone(),
                options: *options,
                state: *state,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(n: u8) -> SubscribeOptions {
        SubscribeOptions::new(QoS::from_u8(n).unwrap_or_default())
    }

    #[test]
    fn session_lost_restores_every_subscription_with_its_own_qos() {
        let mut r = Registry::default();
        r.insert("TEST", q(2));
        r.insert("a/+", q(1).no_local(true));
        r.insert("b/#", q(0));
        let (batches, unsub) = r.on_connect(false);
        assert!(unsub.is_empty());
        let all: Vec<_> = batches.into_iter().flatten().collect();
        assert_eq!(
            all,
            vec![
                ("TEST".to_owned(), q(2)),
                ("a/+".to_owned(), q(1).no_local(true)),
                ("b/#".to_owned(), q(0)),
            ]
        );
    }

    #[test]
    fn session_present_sends_only_unconfirmed_and_unsubscribes_stale() {
        let mut r = Registry::default();
        r.insert("TEST", q(2));
        r.insert("new", q(1));
        r.confirm(
            "TEST",
            &q(2),
            Ok(SubscribeOutcome::Granted(QoS::ExactlyOnce)),
        );
        r.insert("gone", q(1));
        r.confirm(
            "gone",
            &q(1),
            Ok(SubscribeOutcome::Granted(QoS::AtLeastOnce)),
        );
        assert!(r.remove("gone"));
        r.mark_stale("gone");
        let (batches, unsub) = r.on_connect(true);
        let all: Vec<_> = batches.into_iter().flatten().collect();
        assert_eq!(all, vec![("new".to_owned(), q(1))]);
        assert_eq!(unsub, vec!["gone".to_owned()]);
        // A later session loss sends everything again.
        let (batches, unsub) = r.on_connect(false);
        assert_eq!(batches.into_iter().flatten().count(), 2);
        assert!(unsub.is_empty());
    }

    #[test]
    fn batches_split_by_subscription_identifier_and_size() {
        let mut r = Registry::default();
        for i in 0..40 {
            r.insert(&format!("t/{i}"), q(1));
        }
        r.insert("id/7", q(2).subscription_identifier(7));
        let (batches, _) = r.on_connect(false);
        let sizes: Vec<_> = batches.iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![32, 8, 1]);
        assert!(batches[2][0].1.subscription_identifier == Some(7));
    }

    #[test]
    fn a_replaced_subscription_ignores_the_old_suback() {
        let mut r = Registry::default();
        r.insert("x", q(0));
        r.insert("x", q(2));
        r.confirm("x", &q(0), Ok(SubscribeOutcome::Granted(QoS::AtMostOnce)));
        assert_eq!(r.get("x"), Some((q(2), SubscriptionState::Unconfirmed)));
    }

    #[test]
    fn outcome_from_suback() {
        use SubscribeOutcome::*;
        assert_eq!(
            SubscribeOutcome::from_suback(QoS::ExactlyOnce, ReasonCode(1)),
            Ok(Downgraded {
                requested: QoS::ExactlyOnce,
                granted: QoS::AtLeastOnce
            })
        );
        assert_eq!(
            SubscribeOutcome::from_suback(QoS::AtLeastOnce, ReasonCode(1)),
            Ok(Granted(QoS::AtLeastOnce))
        );
        assert_eq!(
            SubscribeOutcome::from_suback(QoS::AtLeastOnce, ReasonCode(0x87)),
            Err(ReasonCode(0x87))
        );
    }
}
