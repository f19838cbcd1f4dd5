//! The broker with Mosquitto's own command-line clients: the first thing a user would try.
#![allow(clippy::unwrap_used, missing_docs)]

use qosmos_broker::{Broker, Config};
use std::time::Duration;
use tokio::process::Command;

async fn start() -> (
    std::net::SocketAddr,
    qosmos_broker::BrokerHandle,
    tokio::sync::oneshot::Sender<()>,
) {
    let config = Config {
        mqtt_addr: "127.0.0.1:0".parse().unwrap(),
        ..Default::default()
    };
    let broker = Broker::bind(config).await.unwrap();
    let addr = broker.mqtt_addr();
    let handle = broker.handle();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(broker.run(async move {
        let _ = rx.await;
    }));
    (addr, handle, tx)
}

#[tokio::test]
async fn mosquitto_clients_qos_0_1_2_both_versions() {
    let (addr, handle, _stop) = start().await;
    let port = addr.port().to_string();
    for version in ["mqttv311", "mqttv5"] {
        for qos in ["0", "1", "2"] {
            let topic = format!("smoke/{version}/{qos}");
            let sub = Command::new("mosquitto_sub")
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port,
                    "-V",
                    version,
                    "-q",
                    qos,
                    "-t",
                    &topic,
                    "-C",
                    "3",
                    "-v",
                ])
                .kill_on_drop(true)
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("mosquitto_sub (Debian package mosquitto-clients) must be installed");
            // Publish once the broker shows the subscription, at the QoS asked for.
            tokio::time::timeout(Duration::from_secs(10), async {
                while !handle
                    .subscriptions()
                    .iter()
                    .any(|s| s.topic == topic && s.qos.to_string() == qos)
                {
                    tokio::task::yield_now().await;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
            .await
            .expect("subscription never appeared");
            for i in 0..3 {
                let st = Command::new("mosquitto_pub")
                    .args([
                        "-h",
                        "127.0.0.1",
                        "-p",
                        &port,
                        "-V",
                        version,
                        "-q",
                        qos,
                        "-t",
                        &topic,
                        "-m",
                        &format!("m{i}"),
                    ])
                    .status()
                    .await
                    .unwrap();
                assert!(st.success());
            }
            let out = tokio::time::timeout(Duration::from_secs(10), sub.wait_with_output())
                .await
                .unwrap()
                .unwrap();
            let text = String::from_utf8(out.stdout).unwrap();
            assert_eq!(
                text,
                format!("{topic} m0\n{topic} m1\n{topic} m2\n"),
                "{version} qos {qos}"
            );
        }
    }
}
